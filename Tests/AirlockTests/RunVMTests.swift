import AirlockTestSupport
import Foundation
import Synchronization
import Testing
import VMM
@testable import Airlock

/// VM tests run wherever /dev/kvm is, and fail (never skip) where it is not,
/// unless the run asked to leave them out with AIRLOCK_SKIP_VM_TESTS=1.
enum VMTests {
    static var enabled: Bool { ProcessInfo.processInfo.environment["AIRLOCK_SKIP_VM_TESTS"] != "1" }

    /// The `airlock` executable built beside this test bundle (`make test` builds it first).
    static func airlockExecutable() throws -> String {
        let beside = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent("airlock").path
        let candidates = [beside, repositoryRoot.appendingPathComponent(".build/debug/airlock").path]
        guard let found = candidates.first(where: { FileManager.default.isExecutableFile(atPath: $0) }) else {
            throw TestFailure("no airlock executable at \(candidates): run 'swift build' first (make test does)")
        }
        return found
    }

    static var repositoryRoot: URL {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    }

    /// Runs the CLI with `arguments`, feeding `stdin`; returns status, stdout and stderr.
    static func airlock(_ arguments: [String], stdin: Data? = nil, environment: [String: String] = [:]) throws -> (status: Int32, stdout: String, stderr: String, pid: Int32) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: try airlockExecutable())
        p.arguments = arguments
        if !environment.isEmpty { p.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 } }
        let out = Pipe(), err = Pipe(), input = Pipe()
        p.standardOutput = out
        p.standardError = err
        p.standardInput = stdin == nil ? FileHandle.nullDevice : input
        try p.run()
        if let stdin {
            input.fileHandleForWriting.write(stdin)
            try input.fileHandleForWriting.close()
        }
        // Read both to the end before waiting, so a full pipe cannot stall the child.
        let group = DispatchGroup()
        nonisolated(unsafe) var outData = Data(), errData = Data()
        DispatchQueue.global().async(group: group) { outData = out.fileHandleForReading.readDataToEndOfFile() }
        DispatchQueue.global().async(group: group) { errData = err.fileHandleForReading.readDataToEndOfFile() }
        group.wait()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: outData, as: UTF8.self), String(decoding: errData, as: UTF8.self), p.processIdentifier)
    }
}

struct TestFailure: Error, CustomStringConvertible {
    let description: String
    init(_ d: String) { description = d }
}

/// `airlock run` end to end, as a user runs it (jailed, the default): one VM
/// boot covers the command's stdout and stderr kept apart on the real
/// descriptors, its exit status, --env, --workdir, stdin piped through,
/// --max-output's notice on a line of its own, images that only root may read
/// (mode 0600, as `umask 077` makes them: the supervisor opens them for the
/// unprivileged VMM), and a jail that is gone afterwards.
@Suite(.enabled(if: VMTests.enabled, "AIRLOCK_SKIP_VM_TESTS=1 leaves VM tests out"))
struct RunCLIVMTests {
    @Test(.timeLimit(.minutes(8)))
    func streamsAreKeptApartAndStatusEnvironmentWorkdirAndStdinArrive() async throws {
        // Blocking work (processes, a VM) on a thread of its own: the cooperative pool has a
        // thread per core, and a test that holds one for a boot stalls every async test.
        let test = self
        try await offThread { try test.streamsAreKeptApartAndStatusEnvironmentWorkdirAndStdinArriveBlocking() }
    }

    func streamsAreKeptApartAndStatusEnvironmentWorkdirAndStdinArriveBlocking() throws {
        let store = ImageStore()
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("airlock-0600-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let kernel = dir.appendingPathComponent("vmlinux").path, rootfs = dir.appendingPathComponent("rootfs.ext4").path
        try FileManager.default.copyItem(atPath: store.kernelPath, toPath: kernel)
        try FileManager.default.copyItem(atPath: store.rootfsPath, toPath: rootfs)
        chmod(kernel, 0o600)
        chmod(rootfs, 0o600)

        let script = #"echo out; printf err >&2; echo "$GREETING"; pwd; cat; head -c 3000 /dev/zero | tr '\0' x >&2; exit 7"#
        let r = try VMTests.airlock(["run", "--kernel", kernel, "--rootfs", rootfs, "--max-output", "1000",
                                     "--env", "GREETING=hello there", "--workdir", "/tmp", "--", "sh", "-c", script],
                                    stdin: Data("piped input\n".utf8))
        #expect(r.status == 7, "stderr: \(r.stderr)")
        #expect(r.stdout == "out\nhello there\n/tmp\npiped input\n")
        // stderr: "err", then x's up to the limit, then the notice on a line of its own.
        let kept = "err" + String(repeating: "x", count: 997)
        #expect(r.stderr == kept + "\nairlock: stderr was cut at --max-output 1000: 2003 more bytes were dropped\n", "\(r.stderr.suffix(200))")
        // It ran jailed (the default), and its jail and cgroups are gone.
        #expect(JailProbe.leftovers(of: r.pid).isEmpty)
    }
}

/// One VM, many runs, through the Swift API: each check below would otherwise
/// be a boot of its own (tens of seconds on a PVM host). The timeout goes
/// last because it destroys the VM.
@Suite(.enabled(if: VMTests.enabled, "AIRLOCK_SKIP_VM_TESTS=1 leaves VM tests out"))
struct SandboxSessionVMTests {
    @Test(.timeLimit(.minutes(12)))
    func statusesSignalsFailuresLimitsUsersStdinAndTimeoutInOneVM() async throws {
        let sandbox = try await Sandbox.boot(SandboxConfig(memoryMiB: 128))

        // The embedding program's sandbox is jailed like the CLI's (issue 14): its VMM is an
        // airlock-vmm child of this process, PID 1 of its own namespace, every thread filtered,
        // no capability, not root.
        let vmm = try #require(JailProbe.vmm(of: getpid()), "no jailed airlock-vmm below this test process")
        for tid in try FileManager.default.contentsOfDirectory(atPath: "/proc/\(vmm)/task") {
            let status = try String(contentsOfFile: "/proc/\(vmm)/task/\(tid)/status", encoding: .utf8)
            #expect(JailProbe.field("Seccomp", in: status) == "2" && JailProbe.field("NoNewPrivs", in: status) == "1", "thread \(tid)")
            #expect(JailProbe.field("CapEff", in: status) == "0000000000000000", "thread \(tid)")
            #expect(JailProbe.field("Uid", in: status)?.hasPrefix("0") == false, "thread \(tid)")
        }
        for ns in ["mnt", "pid", "net"] {
            #expect(try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(vmm)/ns/\(ns)")
                    != FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/ns/\(ns)"), "\(ns) namespace")
        }

        // A signal reaches the command running in the guest (its process group), once it says it
        // is ready (its trap is set by then).
        let seen = Mutex<[UInt8]>([])
        var trap = Command(["sh", "-c", "trap 'echo got-term; exit 42' TERM; echo ready; while :; do sleep 1; done"])
        trap.stdout = .handler { [sandbox] chunk in
            let text = seen.withLock { $0 += chunk; return String(decoding: $0, as: UTF8.self) }
            if text == "ready\n" { sandbox.signal(SIGTERM) }
        }
        let trapped = try await sandbox.run(trap)
        #expect(trapped.exitCode == 42, "status \(trapped.exitCode)")
        #expect(trapped.timings.kernelBootMs > 0 && trapped.timings.vmmStartMs > 0, "the first run carries the boot's timings")
        #expect(String(decoding: seen.withLock { $0 }, as: UTF8.self) == "ready\ngot-term\n")

        let ok = try await sandbox.run(Command(["true"]))
        #expect(ok.exitCode == 0 && ok.signal == nil && ok.failure == nil && !ok.timedOut)
        #expect(ok.timings.kernelBootMs == 0 && ok.timings.agentReadyMs > 0, "later runs: no boot, their own set-up")

        let killed = try await sandbox.run(Command(["sh", "-c", "echo before; kill -9 $$"]))
        #expect(killed.signal == 9 && killed.exitCode == 137)
        #expect(killed.stdoutText == "before\n")

        let missing = try await sandbox.run(Command(["no-such-command", "x"]))
        #expect(missing.exitCode == 127)
        #expect(missing.failure?.contains("no-such-command") == true)

        let notExecutable = try await sandbox.run(Command(["/etc/passwd"]))
        #expect(notExecutable.exitCode == 126)

        var badDir = Command(["true"])
        badDir.workingDirectory = "/no/such/dir"
        let setup = try await sandbox.run(badDir)
        #expect(setup.exitCode == 125 && setup.failure?.contains("/no/such/dir") == true)

        var asUser = Command(["id"])
        asUser.user = "airlock"
        let id = try await sandbox.run(asUser)
        #expect(id.stdoutText.hasPrefix("uid=1000(airlock) gid=1000(airlock)"), "\(id.stdoutText) \(id.stderrText)")

        var flood = Command(["sh", "-c", "head -c 100000 /dev/zero; echo done >&2"])
        flood.maxOutputBytes = 1000
        let truncated = try await sandbox.run(flood)
        #expect(truncated.stdout == [UInt8](repeating: 0, count: 1000))
        #expect(truncated.outputTruncated && truncated.stderrText == "done\n" && truncated.exitCode == 0)

        // More stdin than one frame and than the agent's pipe holds at once.
        var count = Command(["wc", "-c"])
        count.stdin = .bytes([UInt8](repeating: 0x61, count: 300_000))
        let counted = try await sandbox.run(count)
        #expect(counted.stdoutText.trimmingCharacters(in: .whitespacesAndNewlines) == "300000")

        var sleeper = Command(["sleep", "1000"])
        sleeper.timeoutSeconds = 5
        let start = ContinuousClock.now
        let timedOut = try await sandbox.run(sleeper)
        let wall = ContinuousClock.now - start
        #expect(timedOut.timedOut && timedOut.exitCode == 124)
        #expect(timedOut.timings.commandMs >= 5000 && timedOut.timings.commandMs < 6000, "\(timedOut.timings)")
        // Whole call: the agent's set-up, the 5 s, and a grace to destroy the VM that a loaded
        // host needs (beside the whole suite's VMs on two cores: 12 s seen), far below the 1000 s.
        #expect(wall < .milliseconds(Int(timedOut.timings.agentReadyMs) + 5000 + 30000), "\(wall) \(timedOut.timings)")
        await #expect(throws: SandboxError.self) { try await sandbox.run(Command(["true"])) }
    }
}

/// Bad input to `airlock run` is refused before anything boots: status 125 and
/// a message that names the option or file and what to do. No VM needed.
struct RunCLIInputTests {
    @Test(arguments: [
        (["run", "--bogus", "--", "true"], "Unknown option '--bogus'"),
        (["run"], "no command given"),
        (["run", "--", ""], "no command given"),
        (["run", "--memory", "lots", "--", "true"], "--memory 'lots' is not a size"),
        (["run", "--memory", "8", "--", "true"], "--memory 8 MiB is too small"),
        (["run", "--cpus", "2", "--", "true"], "until SMP support lands"),
        (["run", "--kernel", "/no/such/vmlinux", "--", "true"], "guest kernel /no/such/vmlinux does not exist: check the path given to --kernel"),
        (["run", "--rootfs", "/no/such/rootfs.ext4", "--", "true"], "root filesystem /no/such/rootfs.ext4 does not exist"),
        (["run", "--timeout", "-1", "--", "true"], "--timeout -1.0 is not a positive, finite number"),
        (["run", "--env", "=x", "--", "true"], "--env '=x' has no name"),
        (["run", "--max-output", "many", "--", "true"], "--max-output 'many' is not a size"),
        // A newcomer's survey (issue 13): each refused before any boot, naming what is wrong.
        (["run", "--memory", "-5", "--", "true"], "--memory -5 is not a positive size"),
        (["run", "--timeout", "inf", "--", "true"], "--timeout inf is not a positive, finite number"),
        (["run", "--boot-timeout", "inf", "--", "true"], "--boot-timeout inf is not a positive, finite number"),
        (["run", "--boot-timeout", "nan", "--", "true"], "--boot-timeout nan is not a positive, finite number"),
        (["run", "--memory", "64G", "--", "true"], "is more than this host can give"),
        (["run", "--user", "", "--", "true"], "--user '' is empty"),
        (["run", "--user", "root:", "--", "true"], "has an empty group"),
        (["run", "--user", "nosuchuser", "--", "true"], "'nosuchuser' is not in the guest's /etc/passwd"),
        (["run", "--user", "airlock:nosuchgroup", "--", "true"], "group 'nosuchgroup' is not in the guest's /etc/group"),
        (["run", "--workdir", "", "--", "true"], "--workdir '' is not an absolute path"),
        (["run", "--workdir", "tmp", "--", "true"], "--workdir 'tmp' is not an absolute path"),
        (["run", "--env", "A B=1", "--", "true"], "'A B' is not a usable variable name"),
        (["run", "--kernel", "/etc/hostname", "--", "true"], "/etc/hostname"),
    ])
    func badInputIsRefusedWithWhatToDo(arguments: [String], message: String) throws {
        let r = try VMTests.airlock(arguments)
        #expect(r.status == 125, "\(arguments): \(r.stderr)")
        #expect(r.stderr.contains(message), "\(arguments): \(r.stderr)")
        #expect(r.stdout.isEmpty)
    }

    /// The guest mode's environment variable: a value it does not know is refused, not taken as `auto`.
    @Test func anUnknownAIRLOCK_PVIsRefused() throws {
        let r = try VMTests.airlock(["run", "--", "true"], environment: ["AIRLOCK_PV": "native"])
        #expect(r.status == 125, "\(r.stderr)")
        #expect(r.stderr.contains("AIRLOCK_PV='native' is not auto, off or kernel"), "\(r.stderr)")
    }

    /// A root filesystem without the agent, or one that is not ext4 at all, is
    /// refused from the image itself, before a boot.
    @Test func aRootFilesystemWithoutTheAgentIsRefusedBeforeBooting() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("airlock-noagent-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: dir) }
        let build = Process()
        build.executableURL = VMTests.repositoryRoot.appendingPathComponent("rootfs/build.sh")
        build.arguments = ["--out", dir.path]
        build.standardOutput = FileHandle.nullDevice
        build.standardError = FileHandle.nullDevice
        try build.run()
        build.waitUntilExit()
        try #require(build.terminationStatus == 0)
        let image = dir.appendingPathComponent("rootfs.ext4").path
        let start = ContinuousClock.now
        let r = try VMTests.airlock(["run", "--rootfs", image, "--", "true"])
        #expect(r.status == 125)
        #expect(r.stderr.contains("'\(image)' has no /sbin/airlock-init: rebuild it with 'make rootfs'"), "\(r.stderr)")
        #expect(ContinuousClock.now - start < .seconds(5), "refused before any boot")

        let notExt4 = try VMTests.airlock(["run", "--rootfs", "/etc/passwd", "--", "true"])
        #expect(notExt4.status == 125 && notExt4.stderr.contains("is not an ext2/3/4 image"), "\(notExt4.stderr)")
    }
}

/// The jail never makes a KVM device of its own: a caller who cannot open /dev/kvm gets the
/// same clear error from `run` as from `doctor` (issue 13). Each case runs in a private mount
/// namespace where /dev/kvm is hidden; no VM boots.
struct KVMDeviceVisibilityTests {
    func inPrivateMountNamespace(_ setup: String) throws -> (status: Int32, output: String) {
        try JailProbe.requireRoot()
        let airlock = try VMTests.airlockExecutable()
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/unshare")
        p.arguments = ["-m", "--propagation", "private", "sh", "-c",
                       "\(setup) || exit 99; \(airlock) run -- true; echo run-status=$?; \(airlock) doctor; echo doctor-status=$?"]
        let out = Pipe()
        p.standardOutput = out
        p.standardError = out
        p.standardInput = FileHandle.nullDevice
        try p.run()
        let text = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        return (p.terminationStatus, text)
    }

    @Test func devNullOverDevKVMIsRefusedByRunAndDoctorAlike() throws {
        let r = try inPrivateMountNamespace("mount --bind /dev/null /dev/kvm")
        #expect(r.output.contains("run-status=125"), "\(r.output)")
        #expect(r.output.contains("airlock: /dev/kvm is not the KVM device"), "\(r.output)")
        #expect(r.output.contains("FAIL /dev/kvm: /dev/kvm is not the KVM device"), "doctor says the same: \(r.output)")
        #expect(r.output.contains("doctor-status=1"), "\(r.output)")
    }

    @Test func anEmptyDevIsRefusedByRunAndDoctorAlike() throws {
        let r = try inPrivateMountNamespace("mount -t tmpfs none /dev")
        #expect(r.output.contains("run-status=125"), "\(r.output)")
        #expect(r.output.contains("airlock: /dev/kvm does not exist"), "\(r.output)")
        #expect(r.output.contains("FAIL /dev/kvm: /dev/kvm does not exist"), "\(r.output)")
    }
}
