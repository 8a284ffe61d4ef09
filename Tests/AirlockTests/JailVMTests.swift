import AirlockTestSupport
import Foundation
import Testing
@testable import Airlock

/// The jail around the real VMM (`airlock run` without --no-jail), seen from
/// the host: what a running VMM process may do, that forbidden system calls end
/// it with the sandbox status, and that nothing outlives a run. Needs root and
/// /dev/kvm; fails loudly without them.
enum JailProbe {
    static func requireRoot() throws {
        guard getuid() == 0 else { throw TestFailure("the jail tests need root (namespaces, cgroups): run the suite as root, or AIRLOCK_SKIP_VM_TESTS=1") }
    }

    /// Starts `airlock run ARGS` with stdout on a pipe.
    static func start(_ arguments: [String]) throws -> (process: Process, stdout: FileHandle, stderr: Pipe) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: try VMTests.airlockExecutable())
        p.arguments = arguments
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        p.standardInput = FileHandle.nullDevice
        try p.run()
        return (p, out.fileHandleForReading, err)
    }

    /// The jailed VMM of supervisor `pid`: the `airlock-vmm` descendant that is PID 1 of its own namespace.
    static func vmm(of supervisor: Int32) -> Int32? {
        for entry in (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? [] {
            guard let pid = Int32(entry), let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8),
                  let cmdline = try? Data(contentsOf: URL(fileURLWithPath: "/proc/\(pid)/cmdline")),
                  String(decoding: cmdline, as: UTF8.self).contains("airlock-vmm") else { continue }
            let nspid = field("NSpid", in: status)?.split(separator: "\t").map(String.init) ?? []
            guard nspid.last == "1", descends(pid, from: supervisor) else { continue }
            return pid
        }
        return nil
    }

    static func descends(_ pid: Int32, from ancestor: Int32) -> Bool { ProcStatus.descends(pid, from: ancestor) }

    static func field(_ name: String, in status: String) -> String? { ProcStatus.field(name, in: status) }

    static func waitFor<T>(seconds: Double, _ poll: () -> T?) -> T? {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if let v = poll() { return v }
            usleep(20_000)
        }
        return nil
    }

    /// Jail directories and cgroups named after supervisor `pid` (ids are vm-<pid>-...).
    static func leftovers(of supervisor: Int32) -> [String] {
        var found: [String] = []
        let prefix = "vm-\(supervisor)-"
        let jails = (try? FileManager.default.contentsOfDirectory(atPath: "/run/airlock/jail")) ?? []
        found += jails.filter { $0.hasPrefix(prefix) }.map { "/run/airlock/jail/" + $0 }
        if let walker = FileManager.default.enumerator(atPath: "/sys/fs/cgroup") {
            while let path = walker.nextObject() as? String {
                if walker.level > 5 { walker.skipDescendants(); continue }
                if (path as NSString).lastPathComponent.hasPrefix(prefix) {
                    found.append("/sys/fs/cgroup/" + path)
                    walker.skipDescendants()
                }
            }
        }
        return found
    }

    /// What descriptor `fd` of this process refers to, as /proc shows it ("pipe:[1234]"), or "" when it is closed.
    static func fdTarget(_ fd: Int32) -> String {
        (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\(fd)")) ?? ""
    }

    static func ownDescriptorTargets() -> Set<String> {
        let fds = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
        return Set(fds.compactMap { Int32($0) }.map(fdTarget))
    }

    /// Mount points on the host that lie in a jail of supervisor `pid`.
    static func mounts(of supervisor: Int32) -> [String] {
        // Read to the end: String(contentsOfFile:) stops after one read (about 4 KiB) of a /proc file.
        let mountinfo = String(decoding: FileHandle(forReadingAtPath: "/proc/self/mountinfo")?.readDataToEndOfFile() ?? Data(), as: UTF8.self)
        let prefix = "/run/airlock/jail/vm-\(supervisor)-"
        return mountinfo.split(separator: "\n").compactMap { line in
            let point = line.split(separator: " ").dropFirst(4).first.map(String.init) ?? ""
            return point.hasPrefix(prefix) ? point : nil
        }
    }

    /// Descriptors, in any process on the host, that point into a jail of supervisor `pid`.
    static func descriptorsIntoJails(of supervisor: Int32) -> [String] {
        let prefix = "/run/airlock/jail/vm-\(supervisor)-"
        var found: [String] = []
        for entry in (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? [] {
            guard Int32(entry) != nil else { continue }
            for fd in (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(entry)/fd")) ?? [] {
                let link = "/proc/\(entry)/fd/\(fd)"
                if let target = try? FileManager.default.destinationOfSymbolicLink(atPath: link), target.hasPrefix(prefix) {
                    found.append("\(link) -> \(target)")
                }
            }
        }
        return found
    }
}

/// A forbidden system call in the real VMM, on its main thread or a vCPU
/// thread, after the filters are on: SIGSYS, the sandbox status (the CLI turns
/// it into 125 with the call named), and no jail left. No guest boots: the
/// call is made before the first KVM_RUN.
@Suite(.enabled(if: VMTests.enabled, "AIRLOCK_SKIP_VM_TESTS=1 leaves VM tests out"))
struct SeccompInTheVMMTests {
    @Test(arguments: ["main", "vcpu"], [("execve", "execve (59)"), ("socket", "socket (41)"), ("open", "openat (257)"), ("ioctl", "ioctl (16)")])
    func aForbiddenCallEndsTheVMMWithTheSandboxStatus(role: String, call: (name: String, reported: String)) async throws {
        // Blocking work (processes, a VM) on a thread of its own: the cooperative pool has a
        // thread per core, and a test that holds one for a boot stalls every async test.
        let test = self
        try await offThread { try test.aForbiddenCallEndsTheVMMWithTheSandboxStatusBlocking(role: role, call: call) }
    }

    func aForbiddenCallEndsTheVMMWithTheSandboxStatusBlocking(role: String, call: (name: String, reported: String)) throws {
        try JailProbe.requireRoot()
        let (p, out, err) = try JailProbe.start(["run", "--no-snapshot", "--test-violation", "\(role):\(call.name)", "--", "true"])
        _ = out.readDataToEndOfFile()
        let stderr = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        #expect(p.terminationStatus == 125)
        #expect(stderr.contains("blocked system call \(call.reported) on the \(role) thread"), "\(stderr)")
        #expect(stderr.contains("the VMM broke its seccomp sandbox"), "\(stderr)")
        #expect(JailProbe.leftovers(of: p.processIdentifier).isEmpty)
    }
}

@Suite(.enabled(if: VMTests.enabled, "AIRLOCK_SKIP_VM_TESTS=1 leaves VM tests out"))
struct JailedVMMTests {
    /// While its guest boots, every thread of the VMM is filtered, unprivileged
    /// and namespaced, its root is the jail, its descriptors are the declared
    /// ones and what it opened in the jail, its cgroup limits are in force;
    /// killing it ends the run as an Airlock failure and leaves nothing behind.
    @Test(.timeLimit(.minutes(3)))
    func aRunningVMMIsConfinedAndAKilledOneLeavesNothing() async throws {
        // Blocking work (processes, a VM) on a thread of its own: the cooperative pool has a
        // thread per core, and a test that holds one for a boot stalls every async test.
        let test = self
        try await offThread { try test.aRunningVMMIsConfinedAndAKilledOneLeavesNothingBlocking() }
    }

    func aRunningVMMIsConfinedAndAKilledOneLeavesNothingBlocking() throws {
        try JailProbe.requireRoot()
        // --no-snapshot: a cold boot's jail (a restored one's: SnapshotCLIVMTests).
        let (p, out, err) = try JailProbe.start(["run", "--no-snapshot", "--memory", "128", "--", "sleep", "60"])
        let supervisor = p.processIdentifier
        defer { if p.isRunning { p.terminate() } }
        // Found once its vCPU thread exists (a thread set up after the machine: main, pumps, vCPU).
        let vmm = try #require(JailProbe.waitFor(seconds: 30) { () -> Int32? in
            guard let pid = JailProbe.vmm(of: supervisor),
                  let tasks = try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task"), tasks.count >= 4 else { return nil }
            return pid
        }, "no jailed VMM with its threads appeared")
        usleep(300_000)  // the vCPU thread installs its filter first thing

        let tasks = try FileManager.default.contentsOfDirectory(atPath: "/proc/\(vmm)/task")
        for tid in tasks {
            let status = try String(contentsOfFile: "/proc/\(vmm)/task/\(tid)/status", encoding: .utf8)
            for (name, want) in [("Seccomp", "2"), ("NoNewPrivs", "1"), ("CapEff", "0000000000000000"),
                                 ("CapPrm", "0000000000000000"), ("CapBnd", "0000000000000000"), ("CapAmb", "0000000000000000")] {
                #expect(JailProbe.field(name, in: status) == want, "thread \(tid) \(name)")
            }
            let uids = JailProbe.field("Uid", in: status)?.split(separator: "\t") ?? []
            let gids = JailProbe.field("Gid", in: status)?.split(separator: "\t") ?? []
            #expect(!uids.isEmpty && !uids.contains("0") && !gids.contains("0"), "thread \(tid) runs as \(uids) / \(gids)")
        }
        for ns in ["mnt", "pid", "ipc", "uts", "net"] {
            let theirs = try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(vmm)/ns/\(ns)")
            let ours = try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/ns/\(ns)")
            #expect(theirs != ours, "\(ns) namespace is the host's")
        }
        let root = try FileManager.default.contentsOfDirectory(atPath: "/proc/\(vmm)/root").sorted()
        #expect(root == [], "the VMM's root holds \(root): it should be empty (it gets descriptors, not files)")
        // The jail spec came on a pipe and is gone: nothing of it in the VMM's environment.
        let environ = String(decoding: (try? Data(contentsOf: URL(fileURLWithPath: "/proc/\(vmm)/environ"))) ?? Data(), as: UTF8.self)
        #expect(!environ.contains("airlock-jail-spec") && !environ.contains("/run/airlock/jail"), "environment: \(environ)")

        // Descriptors: only what the supervisor handed over (the session socket, /dev/kvm, the
        // images, the run's pipes and sockets) and what KVM and the VMM made (anon inodes).
        let images = ImageStore()
        for fd in try FileManager.default.contentsOfDirectory(atPath: "/proc/\(vmm)/fd") {
            let target = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(vmm)/fd/\(fd)")) ?? "?"
            let allowed = target.hasPrefix("pipe:") || target.hasPrefix("anon_inode:") || target == "/dev/null"
                || target == "/dev/kvm" || target == images.kernelPath || target == images.rootfsPath
                || target.hasPrefix("/dev/pts/") || target.hasPrefix("socket:")
            #expect(allowed, "fd \(fd) of the VMM is \(target)")
        }

        // Cgroup limits, read back from the VMM's own cgroups.
        let cgroups = try String(contentsOfFile: "/proc/\(vmm)/cgroup", encoding: .utf8).split(separator: "\n")
        func cgroupFile(_ controller: String, _ file: String) -> String? {
            guard let line = cgroups.first(where: { $0.split(separator: ":")[1].split(separator: ",").contains(Substring(controller)) }) else { return nil }
            let path = line.split(separator: ":", maxSplits: 2)[2]
            return (try? String(contentsOfFile: "/sys/fs/cgroup/\(controller)\(path)/\(file)", encoding: .utf8))?
                .trimmingCharacters(in: .whitespacesAndNewlines)
        }
        #expect(cgroupFile("memory", "memory.limit_in_bytes") == String((128 << 20) + VMMJail.memoryAllowance))
        #expect(cgroupFile("pids", "pids.max") == "64")
        // One vCPU plus the allowance for the VMM's own threads, per CFS period.
        let period = try #require(cgroupFile("cpu", "cpu.cfs_period_us").flatMap { Double($0) })
        #expect(cgroupFile("cpu", "cpu.cfs_quota_us") == String(Int((1 + VMMJail.cpuAllowance) * period)))
        #expect(!JailProbe.leftovers(of: supervisor).isEmpty, "the jail exists while the VM runs")

        kill(vmm, SIGKILL)
        _ = out.readDataToEndOfFile()
        let stderr = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        #expect(p.terminationStatus == 125, "\(stderr)")
        // Killed while the guest boots or once the command runs: either way the VMM's own end is reported.
        #expect(stderr.contains("the VMM ended while") && stderr.contains("signal 9"), "\(stderr)")
        #expect(JailProbe.leftovers(of: supervisor).isEmpty, "\(JailProbe.leftovers(of: supervisor))")
    }

    /// 200 jailed VMMs that end every way but a clean guest shutdown (which the
    /// CLI VM test covers): a seccomp kill on either thread, SIGKILL from
    /// outside, and the supervisor interrupted (SIGTERM) while the VMM runs.
    /// No jail directory, cgroup, mount or descriptor of ours is left.
    @Test(.timeLimit(.minutes(10)))
    func twoHundredRunsLeaveNothingBehind() async throws {
        // Blocking work (processes, a VM) on a thread of its own: the cooperative pool has a
        // thread per core, and a test that holds one for a boot stalls every async test.
        let test = self
        try await offThread { try test.twoHundredRunsLeaveNothingBehindBlocking() }
    }

    func twoHundredRunsLeaveNothingBehindBlocking() throws {
        try JailProbe.requireRoot()
        // Other suites run in this process at the same time and open and close
        // descriptors and mounts of their own, so totals would race: every check
        // below is about these runs' own pipes, jails and cgroups.
        var supervisors: [Int32] = []
        var pipes: Set<String> = []
        var outcomes: [String: Int] = [:]
        for i in 0..<200 {
            let arguments: [String]
            switch i % 4 {
            case 0: arguments = ["run", "--no-snapshot", "--test-violation", "main:execve", "--", "true"]
            case 1: arguments = ["run", "--no-snapshot", "--test-violation", "vcpu:socket", "--", "true"]
            default: arguments = ["run", "--no-snapshot", "--", "sleep", "60"]
            }
            let (p, out, err) = try JailProbe.start(arguments)
            supervisors.append(p.processIdentifier)
            pipes.insert(JailProbe.fdTarget(out.fileDescriptor))
            pipes.insert(JailProbe.fdTarget(err.fileHandleForReading.fileDescriptor))
            if i % 4 >= 2 {
                // Once the VMM is up, end it from outside (2) or interrupt its supervisor (3).
                if let vmm = JailProbe.waitFor(seconds: 20, { JailProbe.vmm(of: p.processIdentifier) }) {
                    if i % 4 == 2 { kill(vmm, SIGKILL) } else { p.terminate() }
                } else {
                    p.terminate()
                }
            }
            _ = out.readDataToEndOfFile()
            _ = err.fileHandleForReading.readDataToEndOfFile()
            p.waitUntilExit()
            outcomes["\(i % 4):\(p.terminationStatus)", default: 0] += 1
        }
        #expect(outcomes["0:125"] == 50 && outcomes["1:125"] == 50 && outcomes["2:125"] == 50, "\(outcomes)")
        // An interrupted supervisor stops the VM and exits 128+SIGTERM.
        #expect(outcomes["3:143"] == 50, "\(outcomes)")
        let left = supervisors.flatMap { JailProbe.leftovers(of: $0) }
        #expect(left.isEmpty, "\(left.prefix(10))")
        let mounts = supervisors.flatMap { JailProbe.mounts(of: $0) }
        #expect(mounts.isEmpty, "\(mounts.prefix(10))")
        // No process on the host holds a descriptor into one of these jails, and
        // this process holds none of the pipes the runs used.
        let holders = supervisors.flatMap { JailProbe.descriptorsIntoJails(of: $0) }
        #expect(holders.isEmpty, "\(holders.prefix(10))")
        pipes.remove("")
        #expect(pipes.count == 400, "each run has its own stdout and stderr pipe")
        let stillOpen = JailProbe.ownDescriptorTargets().intersection(pipes)
        #expect(stillOpen.isEmpty, "\(stillOpen.prefix(10))")
    }
}
