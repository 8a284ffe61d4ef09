import Foundation
import Testing
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
/// descriptors, its exit status, --env, --workdir, stdin piped through, and a
/// jail that is gone afterwards.
@Suite(.enabled(if: VMTests.enabled, "AIRLOCK_SKIP_VM_TESTS=1 leaves VM tests out"))
struct RunCLIVMTests {
    @Test(.timeLimit(.minutes(5)))
    func streamsAreKeptApartAndStatusEnvironmentWorkdirAndStdinArrive() throws {
        let script = #"echo out; echo err >&2; echo "$GREETING"; pwd; cat; exit 7"#
        let r = try VMTests.airlock(["run", "--env", "GREETING=hello there", "--workdir", "/tmp", "--", "sh", "-c", script],
                                    stdin: Data("piped input\n".utf8))
        #expect(r.status == 7, "stderr: \(r.stderr)")
        #expect(r.stdout == "out\nhello there\n/tmp\npiped input\n")
        #expect(r.stderr == "err\n")
        // It ran jailed (the default), and its jail and cgroups are gone.
        #expect(JailProbe.leftovers(of: r.pid).isEmpty)
    }
}

/// One VM, many runs, through the Swift API: each check below would otherwise
/// be a boot of its own (tens of seconds on a PVM host). The timeout goes
/// last because it destroys the VM.
@Suite(.enabled(if: VMTests.enabled, "AIRLOCK_SKIP_VM_TESTS=1 leaves VM tests out"))
struct SandboxSessionVMTests {
    @Test(.timeLimit(.minutes(8)))
    func statusesSignalsFailuresLimitsUsersStdinAndTimeoutInOneVM() async throws {
        let sandbox = try await Sandbox.boot(SandboxConfig(memoryMiB: 128))

        let ok = try await sandbox.run(Command(["true"]))
        #expect(ok.exitCode == 0 && ok.signal == nil && ok.failure == nil && !ok.timedOut)
        #expect(ok.timings.kernelBootMs > 0 && ok.timings.vmmStartMs > 0)

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
        // Whole call: the agent's set-up, the 5 s, and a small grace to destroy the VM.
        #expect(wall < .milliseconds(Int(timedOut.timings.agentReadyMs) + 5000 + 3000), "\(wall) \(timedOut.timings)")
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
        (["run", "--kernel", "/no/such/vmlinux", "--", "true"], "/no/such/vmlinux cannot be opened"),
        (["run", "--rootfs", "/no/such/rootfs.ext4", "--", "true"], "/no/such/rootfs.ext4 cannot be opened"),
        (["run", "--timeout", "-1", "--", "true"], "--timeout"),
        (["run", "--env", "=x", "--", "true"], "--env '=x' has no name"),
        (["run", "--max-output", "many", "--", "true"], "--max-output 'many' is not a size"),
    ])
    func badInputIsRefusedWithWhatToDo(arguments: [String], message: String) throws {
        let r = try VMTests.airlock(arguments)
        #expect(r.status == 125, "\(arguments): \(r.stderr)")
        #expect(r.stderr.contains(message), "\(arguments): \(r.stderr)")
        #expect(r.stdout.isEmpty)
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
