import AirlockOS
@testable import Jailer
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The jail around a real process: airlock-jail-probe enters it through the
/// supervisor API exactly as the VMM will, and the tests look at it from the
/// host's /proc while it runs.
@Suite(.serialized) struct JailedProbeTests {
    @Test func everyThreadIsConfinedAndTheJailIsAllItSees() throws {
        try requireRoot()
        let run = try ProbeRun(id: TestJails.uniqueID("confined"), arguments: ["--hold"], passKVM: true)
        let lines = run.ready()
        try #require(lines.contains("ready"), "probe output: \(lines), stderr: \(run.stderr.lines(until: nil, timeout: 0.2))")
        let pid = try run.vmmPid()
        let config = TestJails.config

        // Every thread: seccomp filter mode, no_new_privs, no capability, the jail's ids.
        let tasks = try FileIO.list("/proc/\(pid)/task")
        #expect(tasks.count == 2, "the probe runs a main and a vcpu thread")
        for task in tasks {
            let status = try statusFields("/proc/\(pid)/task/\(task)/status")
            #expect(status["Seccomp"] == "2", "thread \(task)")
            #expect(status["Seccomp_filters"] == (task == String(pid) ? "1" : "2"), "main: 1 filter, vcpu: main's + its own")
            #expect(status["NoNewPrivs"] == "1", "thread \(task)")
            for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
                #expect(status[cap] == "0000000000000000", "thread \(task) \(cap)")
            }
            let uids = status["Uid"]?.split(whereSeparator: { $0 == "\t" || $0 == " " }).map(String.init) ?? []
            let gids = status["Gid"]?.split(whereSeparator: { $0 == "\t" || $0 == " " }).map(String.init) ?? []
            #expect(uids == Array(repeating: String(config.uid), count: 4), "real, effective, saved and fs uid")
            #expect(gids == Array(repeating: String(config.gid), count: 4))
            #expect(status["Groups"] == "", "no supplementary groups")
        }
        let status = try statusFields("/proc/\(pid)/status")
        #expect(status["NSpid"]?.hasSuffix("\t1") == true, "PID 1 of its own PID namespace: \(status["NSpid"] ?? "")")

        // Namespaces: all new but the user namespace (off by default).
        for ns in ["mnt", "pid", "net", "ipc", "uts", "cgroup"] {
            let mine = readLink("/proc/self/ns/\(ns)"), its = readLink("/proc/\(pid)/ns/\(ns)")
            #expect(its != nil && its != mine, "\(ns) namespace: \(its ?? "?") vs the host's \(mine ?? "?")")
        }
        #expect(readLink("/proc/\(pid)/ns/user") == readLink("/proc/self/ns/user"))

        // Its root is the jail: empty. No file, no /dev: the VMM gets what it uses as descriptors.
        #expect(try FileIO.list("/proc/\(pid)/root") == [])
        #expect(lines.contains("root "), "the probe's own view: \(lines)")
        // Its mount table: the jail's empty tmpfs, read-only, nothing of the host's.
        let mounts = try FileIO.read("/proc/\(pid)/mountinfo").split(separator: "\n").map { line -> (String, [String]) in
            let f = line.split(separator: " ").map(String.init)
            return (f[4], f[5].split(separator: ",").map(String.init))
        }
        #expect(mounts.map(\.0) == ["/"], "\(mounts)")
        for (point, options) in mounts {
            #expect(options.contains("ro") && options.contains("nosuid") && options.contains("noexec") && options.contains("nodev"),
                    "\(point): \(options)")
        }

        // Only the declared descriptors: stdin, stdout, stderr and the /dev/kvm it was handed.
        let fds = try FileIO.list("/proc/\(pid)/fd").compactMap(Int32.init).sorted()
        #expect(fds == [0, 1, 2, 3], "fds: \(fds)")
        #expect(readLink("/proc/\(pid)/fd/3") == "/dev/kvm", "the supervisor's /dev/kvm")
        #expect(lines.contains("kvm passed"))
        // The jail spec travelled on a pipe the child read and closed: nothing of it is in the environment.
        let environ = (try? FileIO.read("/proc/\(pid)/environ")) ?? ""
        #expect(!environ.contains("airlock-jail-spec") && !environ.contains(TestJails.config.jailBase), "environment: \(environ)")

        // Resource limits of the process itself.
        let limits = try FileIO.read("/proc/\(pid)/limits")
        func limit(_ name: String) -> [String] {
            let line = limits.split(separator: "\n").first { $0.hasPrefix(name) } ?? ""
            return line.dropFirst(name.count).split(separator: " ").prefix(2).map(String.init)
        }
        #expect(limit("Max file size") == ["1048576", "1048576"], "RLIMIT_FSIZE is what the request said (the writable disks' size)")
        #expect(limit("Max core file size") == ["0", "0"])
        #expect(limit("Max open files") == ["256", "256"])

        // Stage 1 keeps none of the VMM's descriptors, only the lifeline and its
        // own signalfd: it cannot delay the supervisor's EOF.
        let stage1 = try FileIO.list("/proc/\(run.child.pid)/fd").compactMap { readLink("/proc/\(run.child.pid)/fd/\($0)") }
        #expect(stage1.filter { $0.hasPrefix("pipe:") }.count == 2, "lifeline and parent-death pipe: \(stage1)")
        #expect(stage1.count == 3, "\(stage1)")

        run.release()
        #expect(try run.finish() == .exited(0))
        #expect(!FileIO.exists(run.jail.directory))
        for dir in run.jail.cgroupDirectories { #expect(!FileIO.exists(dir)) }
    }

    static let violations: [(String, String, String)] = [
        ("execve", "main", "execve"), ("execve", "vcpu", "execve"),
        ("socket", "main", "socket"), ("socket", "vcpu", "socket"),
        ("open", "main", "openat"), ("open", "vcpu", "openat"),
        ("ioctl", "main", "ioctl"), ("ioctl", "vcpu", "ioctl"),
        ("mmap-exec", "main", "mmap"), ("mmap-exec", "vcpu", "mmap"),
        ("fork", "main", "clone"), ("fork", "vcpu", "clone"),
    ]

    @Test(arguments: violations)
    func aForbiddenCallEndsTheVMMWithTheSandboxExitCode(_ kind: String, _ thread: String, _ syscall: String) throws {
        try requireRoot()
        let run = try ProbeRun(id: TestJails.uniqueID("violate-\(kind)-\(thread)"), arguments: ["--violate", kind, "--on", thread],
                               passKVM: kind == "ioctl")
        let exit = try run.finish()
        let stderr = run.stderr.all()
        let stdout = run.stdout.all()
        #expect(exit == .exited(JailExitCode.seccompViolation), "stdout: \(stdout) stderr: \(stderr)")
        #expect(exit.isSeccompViolation)
        #expect(stderr.contains("sandbox violation: the seccomp filter blocked system call \(syscall) ("), "\(stderr)")
        #expect(stderr.contains("on the \(thread) thread"), "\(stderr)")
        #expect(!stdout.contains("survived"), "\(stdout)")
    }

    @Test func outputToARegularFileLiftsTheFileSizeLimit() throws {
        try requireRoot()
        let path = "/run/airlock-test/images/output-\(TestJails.uniqueID("out"))"
        let out = OwnedFileDescriptor(adopting: open(path, O_CREAT | O_WRONLY | O_TRUNC | O_CLOEXEC, 0o644))
        defer { unlink(path) }
        let jail = try TestJails.supervisor.prepare(id: TestJails.uniqueID("file-output"), TestJails.request())
        let child = try jail.spawn(executable: TestJails.probePath, arguments: [], fds: [1: out.rawValue, 2: out.rawValue])
        #expect(try child.wait(timeout: 10) == .exited(0))
        try jail.destroy()
        // Everything the probe said reached the file: RLIMIT_FSIZE did not cut it off.
        #expect(try FileIO.read(path).contains("ready"))
    }

    @Test func allowedKVMRequestsPassOnEveryThread() throws {
        try requireRoot()
        let run = try ProbeRun(id: TestJails.uniqueID("allowed"), arguments: ["--allowed-ioctl"], passKVM: true)
        let exit = try run.finish()
        let stdout = run.stdout.all()
        #expect(exit == .exited(0), "stdout: \(stdout) stderr: \(run.stderr.all())")
        // KVM_IRQ_LINE on /dev/kvm itself is an error from KVM (not a VM fd), but not a violation.
        #expect(stdout.contains("allowed ioctl(KVM_IRQ_LINE) on main -> -"), "\(stdout)")
        #expect(stdout.contains("allowed ioctl(KVM_IRQ_LINE) on vcpu -> -"), "\(stdout)")
    }

    /// A vCPU thread that allocates and frees megabytes under its filter lives:
    /// malloc must not need a system call the filters forbid (glibc shrinking a
    /// thread's own arena opens /proc/sys/vm/overcommit_memory).
    @Test func mallocChurnOnAVCPUThreadPassesTheFilter() throws {
        try requireRoot()
        let run = try ProbeRun(id: TestJails.uniqueID("malloc"), arguments: ["--malloc-churn"])
        let exit = try run.finish()
        let stdout = run.stdout.all()
        #expect(exit == .exited(0), "stdout: \(stdout) stderr: \(run.stderr.all())")
        #expect(stdout.contains("malloc churn survived on vcpu"), "\(stdout)")
    }

    @Test func cgroupLimitsAreInForceAndTheGroupGoesAwayWhenTheVMMIsKilled() throws {
        try requireRoot()
        let request = TestJails.request(memory: 80 << 20, tasks: 12, cpus: 0.25)
        let run = try ProbeRun(id: TestJails.uniqueID("cgroup"), arguments: ["--hold"], request: request)
        try #require(run.ready().contains("ready"))
        let pid = try run.vmmPid()
        if TestJails.supervisor.cgroupVersion == "v1" {
            #expect(run.jail.cgroupFile("memory.limit_in_bytes") == String(80 << 20))
            #expect(run.jail.cgroupFile("cpu.cfs_quota_us") == "25000")
            #expect(run.jail.cgroupFile("cpu.cfs_period_us") == "100000")
        } else {
            #expect(run.jail.cgroupFile("memory.max") == String(80 << 20))
            #expect(run.jail.cgroupFile("cpu.max") == "25000 100000")
        }
        #expect(run.jail.cgroupFile("pids.max") == "12")
        for dir in run.jail.cgroupDirectories {
            #expect(Cgroups.processes(in: dir).sorted() == [run.child.pid, pid].sorted(), "stage 1 and the VMM are in \(dir)")
        }
        // The host sees the VMM in the VM's group in every hierarchy the limits are in.
        let groups = try FileIO.read("/proc/\(pid)/cgroup").split(separator: "\n")
        for controller in ["memory", "pids", "cpu"] where TestJails.supervisor.cgroupVersion == "v1" {
            let line = groups.first { $0.split(separator: ":")[1].split(separator: ",").contains(Substring(controller)) }
            #expect(line?.hasSuffix("/\(TestJails.config.cgroupParentName)/\(run.jail.id)") == true, "\(controller): \(line ?? "")")
        }

        // The VMM killed: stage 1 reports it, and nothing of the VM is left.
        kill(pid, SIGKILL)
        #expect(try run.child.wait(timeout: 10) == .signaled(SIGKILL))
        #expect(waitUntil { isGone(pid) })
        try run.jail.destroy()
        for dir in run.jail.cgroupDirectories { #expect(!FileIO.exists(dir), "\(dir) is left") }
        #expect(!FileIO.exists(run.jail.directory))
    }

    @Test func sigkillToTheChildTakesTheVMMWithIt() throws {
        try requireRoot()
        let run = try ProbeRun(id: TestJails.uniqueID("stage1-killed"), arguments: ["--hold"])
        try #require(run.ready().contains("ready"))
        let pid = try run.vmmPid()
        // The VMM's parent-death signal ends it. (It is then the host init's
        // to reap: terminate() is the way that leaves no zombie.)
        run.child.kill(SIGKILL)
        #expect(try run.finish() == .signaled(SIGKILL))
        #expect(waitUntil { isGone(pid) }, "the VMM outlived stage 1")
    }

    @Test func sigtermToTheChildEndsTheVMMAndIsReportedAsSigterm() throws {
        try requireRoot()
        let run = try ProbeRun(id: TestJails.uniqueID("sigterm"), arguments: ["--hold"])
        try #require(run.ready().contains("ready"))
        let pid = try run.vmmPid()
        run.child.kill(SIGTERM)
        #expect(try run.finish() == .signaled(SIGTERM))
        #expect(waitUntil { isGone(pid) })
    }

    @Test func theVMMEndsWhenItsSupervisorIsGone() throws {
        try requireRoot()
        let run = try ProbeRun(id: TestJails.uniqueID("lifeline"), arguments: ["--hold"])
        try #require(run.ready().contains("ready"))
        let pid = try run.vmmPid()
        run.child.closeLifeline()  // what the supervisor's death does
        #expect(try run.finish() == .signaled(SIGKILL))
        #expect(waitUntil { isGone(pid) })
    }

    @Test func aSweepRemovesTheJailOfADeadSupervisor() throws {
        try requireRoot()
        let run = try ProbeRun(id: TestJails.uniqueID("orphan"), arguments: ["--hold"])
        try #require(run.ready().contains("ready"))
        let pid = try run.vmmPid()
        let live = try ProbeRun(id: TestJails.uniqueID("alive"), arguments: ["--hold"])
        try #require(live.ready().contains("ready"))

        run.jail.abandon()  // as if its supervisor had died: the owner lock is free
        let removed = try TestJails.supervisor.sweep()
        #expect(removed == [run.jail.id], "only the abandoned jail goes; the live one stays")
        #expect(try run.child.wait(timeout: 10) != nil)
        #expect(waitUntil { isGone(pid) }, "the sweep killed the orphaned VMM")
        #expect(!FileIO.exists(run.jail.directory))
        for dir in run.jail.cgroupDirectories { #expect(!FileIO.exists(dir)) }
        #expect(FileIO.exists(live.jail.directory))

        live.release()
        #expect(try live.finish() == .exited(0))
    }

    @Test func aJailThatCannotBeBuiltFailsWithTheSetupCodeAndLeavesNothing() throws {
        try requireRoot()
        // RLIMIT_NOFILE below a kept descriptor: Jail.enter refuses before any step runs.
        var request = TestJails.request()
        request.openFiles = 2
        let run = try ProbeRun(id: TestJails.uniqueID("setup-fails"), arguments: [], request: request)
        let exit = try run.finish()
        let stderr = run.stderr.all()
        #expect(exit == .exited(JailExitCode.setupFailed), "\(stderr)")
        #expect(stderr.contains("RLIMIT_NOFILE 2"), "the error names the limit: \(stderr)")
        #expect(!FileIO.exists(run.jail.directory))
    }

    @Test func aUserNamespaceMapsTheJailIdentity() throws {
        try requireRoot()
        let run = try ProbeRun(id: TestJails.uniqueID("userns"), arguments: ["--hold", "--allowed-ioctl"],
                               request: TestJails.request(userNamespace: true), passKVM: true)
        let lines = run.ready()
        try #require(lines.contains("ready"), "\(lines) \(run.stderr.lines(until: nil, timeout: 0.2))")
        let pid = try run.vmmPid()
        #expect(readLink("/proc/\(pid)/ns/user") != readLink("/proc/self/ns/user"))
        for task in try FileIO.list("/proc/\(pid)/task") {
            let status = try statusFields("/proc/\(pid)/task/\(task)/status")
            #expect(status["Seccomp"] == "2" && status["NoNewPrivs"] == "1")
            for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] { #expect(status[cap] == "0000000000000000") }
            // Seen from the host, the process is the jail's uid; inside it is 0, holding nothing.
            #expect(status["Uid"]?.hasPrefix(String(TestJails.config.uid)) == true, "\(status["Uid"] ?? "")")
        }
        #expect(lines.contains { $0.hasPrefix("ids 0 0 0 0") }, "\(lines)")
        #expect(lines.contains("kvm passed"), "\(lines)")
        run.release()
        #expect(try run.finish() == .exited(0))
    }
}

extension JailedProbeTests {
    /// What could leak from a jailed run, seen from the supervisor's side.
    struct HostState: Equatable {
        var fds: [String]
        var mounts: String
        var jailDirectories: [String]
        var cgroups: [String]
        var zombieProbes: Int

        static func now() throws -> HostState {
            let fdNames = try FileIO.list("/proc/self/fd")
            let fds = fdNames.map { "\($0) -> \(readLink("/proc/self/fd/\($0)") ?? "?")" }
            var cgroups: [String] = []
            for parent in try Cgroups.parents(layout: try Cgroups.detect(), procSelfCgroup: try FileIO.read("/proc/self/cgroup"),
                                               name: TestJails.config.cgroupParentName) where FileIO.isDirectory(parent) {
                cgroups += try FileIO.list(parent).filter { FileIO.isDirectory(Cgroups.join(parent, $0)) }.map { Cgroups.join(parent, $0) }
            }
            var zombies = 0
            for pid in try FileIO.list("/proc") where Int32(pid) != nil {
                if let stat = try? FileIO.read("/proc/\(pid)/stat"), stat.contains("(airlock-jail-pr) Z") { zombies += 1 }
            }
            return HostState(fds: fds, mounts: try FileIO.read("/proc/self/mountinfo"),
                             jailDirectories: FileIO.isDirectory(TestJails.config.jailBase) ? try FileIO.list(TestJails.config.jailBase).filter { $0 != ".lock" } : [],
                             cgroups: cgroups, zombieProbes: zombies)
        }
    }

    /// 200 jailed runs that end every way a VMM ends: normally, killed,
    /// timed out and terminated, and stopped by its seccomp filter.
    @Test func twoHundredRunsLeaveNothingBehind() throws {
        try requireRoot()
        _ = TestJails.supervisor
        _ = TestJails.kvm
        let before = try HostState.now()
        for i in 0..<200 {
            let id = TestJails.uniqueID("loop")
            switch i % 4 {
            case 0:
                let run = try ProbeRun(id: id, arguments: [])
                #expect(try run.finish() == .exited(0))
            case 1:
                let run = try ProbeRun(id: id, arguments: ["--hold"])
                try #require(run.ready().contains("ready"))
                kill(try run.vmmPid(), SIGKILL)
                #expect(try run.finish() == .signaled(SIGKILL))
            case 2:
                let run = try ProbeRun(id: id, arguments: ["--hold"])
                #expect(try run.child.wait(timeout: 0.01) == nil, "a held probe cannot be done yet")
                run.child.terminate()
                #expect(try run.finish() == .signaled(SIGTERM))
            default:
                let run = try ProbeRun(id: id, arguments: ["--violate", "execve", "--on", "vcpu"])
                #expect(try run.finish() == .exited(JailExitCode.seccompViolation))
            }
        }
        var after = try HostState.now()
        // The kinds of descriptor a jailed run opens in the supervisor: pidfds,
        // pipes (lifeline, the child's stdio), the jail's lock files, cgroup
        // files. Other suites run in this process at the same time, and one
        // that is booting a VM holds pipes and pidfds of its own for a minute
        // or more, so a few new descriptors of these kinds may be theirs. A
        // leak on any of the four ways a run ends leaves at least 50 (one per
        // run of that kind), so fewer than 50 new ones after a moment to
        // settle means none of ours leaked.
        func leaked(_ state: HostState) -> [String] {
            state.fds.filter { fd in
                !before.fds.contains(fd) && ["pidfd", "pipe:", "/run/airlock-test", "/sys/fs/cgroup"].contains { fd.contains($0) }
            }
        }
        _ = waitUntil(2) { after = (try? HostState.now()) ?? after; return leaked(after).isEmpty }
        #expect(leaked(after).count < 50, "descriptors left open: \(leaked(after).prefix(20))")
        // Descriptors on this suite's own jail base are never another suite's.
        #expect(leaked(after).filter { $0.contains("/run/airlock-test") } == [])
        #expect(after.mounts == before.mounts, "the supervisor's mount table changed")
        #expect(after.jailDirectories == [], "left in \(TestJails.config.jailBase): \(after.jailDirectories)")
        #expect(after.cgroups == [], "cgroups left: \(after.cgroups)")
        #expect(after.zombieProbes <= before.zombieProbes, "VMMs left as zombies")

        // With no VM left, the parent groups can go too (prepare remakes them).
        TestJails.supervisor.removeEmptyCgroupParents()
        let parents = try Cgroups.parents(layout: try Cgroups.detect(), procSelfCgroup: try FileIO.read("/proc/self/cgroup"),
                                          name: TestJails.config.cgroupParentName)
        for parent in parents { #expect(!FileIO.exists(parent), "\(parent) is left") }
    }
}

/// A process that has exited (a zombie waiting for its reaper counts).
func isGone(_ pid: pid_t) -> Bool {
    guard kill(pid, 0) == 0 else { return true }
    guard let stat = try? FileIO.read("/proc/\(pid)/stat"), let close = stat.lastIndex(of: ")") else { return true }
    return stat[stat.index(close, offsetBy: 2)] == "Z"
}

/// Polls `condition` for up to `seconds`.
func waitUntil(_ seconds: Double = 5, _ condition: () -> Bool) -> Bool {
    let deadline = monotonicNanoseconds() + UInt64(seconds * 1e9)
    while monotonicNanoseconds() < deadline {
        if condition() { return true }
        sleepMilliseconds(2)
    }
    return condition()
}
