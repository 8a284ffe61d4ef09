import AirlockOS
import CJailShim
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Where a supervisor keeps its jails, and who the VMMs run as.
public struct JailSupervisorConfig: Sendable, Equatable {
    /// One directory per VM lives here: <base>/<id>/root is the jail's mount point.
    public var jailBase: String = "/run/airlock/jail"
    /// The per-VM cgroups go under a group of this name (see `Cgroups.parents`
    /// for where: nested in the supervisor's own group on v1, beside it on v2).
    public var cgroupParentName: String = "airlock"
    /// The VMM's identity: unused ids, owning nothing on the host. Above
    /// systemd's dynamic and container ranges, below 2^31.
    public var uid: UInt32 = 2_000_000_000
    public var gid: UInt32 = 2_000_000_000

    public init() {}
}

/// How much one VM's jail may use.
public struct JailRequest: Sendable, Equatable {
    public var limits: CgroupLimits
    /// RLIMIT_NOFILE for the VMM.
    public var openFiles: UInt64
    /// RLIMIT_FSIZE: the size of the largest writable disk the supervisor will pass (0: none).
    public var fileSizeLimit: UInt64
    /// RLIMIT_NPROC; see `JailRlimits.processes` before setting it.
    public var processLimit: UInt64?
    public var userNamespace: Bool

    public init(limits: CgroupLimits, openFiles: UInt64 = 256, fileSizeLimit: UInt64 = 0, processLimit: UInt64? = nil,
                userNamespace: Bool = false) {
        self.limits = limits
        self.openFiles = openFiles
        self.fileSizeLimit = fileSizeLimit
        self.processLimit = processLimit
        self.userNamespace = userNamespace
    }
}

/// The supervisor's side of the jail: making and removing each VM's jail
/// directory and cgroup, spawning the jailed child, and sweeping up after
/// supervisors that died.
///
/// Usage, per VM:
///
///     let jail = try supervisor.prepare(id: vmID, request)
///     defer { try? jail.destroy() }      // kills what is left, removes all
///     let child = try jail.spawn(executable: airlockPath, arguments: ["_vmm", ...],
///                                fds: [0: stdinPipe, 1: stdoutPipe, 2: stderrPipe])
///     var exit = try child.wait(timeout: 30)
///     if exit == nil { child.terminate(); exit = try child.wait(timeout: nil) }
///     if exit.isSeccompViolation { report a sandbox failure }
public final class JailSupervisor: Sendable {
    public let config: JailSupervisorConfig
    private let layout: CgroupLayout
    private let cgroupParents: [String]

    /// Detects the cgroup layout; fails when the host cannot jail at all.
    public init(config: JailSupervisorConfig = JailSupervisorConfig()) throws(JailError) {
        guard geteuid() == 0 else {
            throw .invalid("jailing a VMM needs root (namespaces, mounts, cgroups); this process runs as uid \(geteuid()): run airlock as root, or use --no-jail for debugging")
        }
        guard config.uid != 0, config.gid != 0 else {
            throw .invalid("the jail uid and gid must not be 0")
        }
        try JailID.validate(config.cgroupParentName)
        self.config = config
        layout = try Cgroups.detect()
        cgroupParents = try Cgroups.parents(layout: layout, procSelfCgroup: try FileIO.read("/proc/self/cgroup"),
                                            name: config.cgroupParentName)
    }

    /// "v1" or "v2": which cgroup hierarchy the jails use on this host.
    public var cgroupVersion: String {
        if case .v2 = layout { return "v2" }
        return "v1"
    }

    /// Creates <base>/<id>/root and the VM's cgroups with their limits.
    public func prepare(id: String, _ request: JailRequest) throws(JailError) -> PreparedJail {
        try JailID.validate(id)
        try FileIO.makeDirectories(config.jailBase, mode: 0o711, hint: "the jail base directory must be writable by root")
        let global = try GlobalLock(base: config.jailBase, exclusive: false)
        defer { global.release() }

        let directory = Cgroups.join(config.jailBase, id)
        // 0711: in a user namespace the set-up runs as the jail's uid and
        // must be able to pass through to root/.
        if mkdir(directory, 0o711) != 0 {
            let code = errno
            throw .system(SystemError("mkdir", subject: directory, errno: code),
                          hint: code == EEXIST ? "VM id '\(id)' is in use, or a dead supervisor left it: JailSupervisor.sweep() removes leftovers" : "")
        }
        var undo = Cleanup()
        undo.directories.append(directory)
        do throws(JailError) {
            let lockPath = Cgroups.join(directory, "owner.lock")
            let lockFd = try jailCall("open", lockPath) { open(lockPath, O_RDWR | O_CREAT | O_CLOEXEC, 0o600) }
            let lock = OwnedFileDescriptor(adopting: lockFd)
            undo.files.insert(lockPath, at: 0)
            _ = try jailCall("flock", lockPath) { flock(lockFd, LOCK_EX | LOCK_NB) }

            // The cgroups are recorded before they exist, so a sweep after a
            // crash at any point finds them.
            let cgroupDirs = cgroupParents.map { Cgroups.join($0, id) }
            let listPath = Cgroups.join(directory, "cgroups")
            let listFd = try jailCall("open", listPath) { open(listPath, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600) }
            close(listFd)
            undo.files.insert(listPath, at: 0)
            try FileIO.write(listPath, cgroupDirs.joined(separator: "\n") + "\n")
            let made = try Cgroups.create(layout: layout, parents: cgroupParents, id: id, limits: request.limits)
            undo.cgroups = made

            let root = Cgroups.join(directory, "root")
            _ = try jailCall("mkdir", root) { mkdir(root, 0o755) }
            undo.directories.insert(root, at: 0)

            let spec = JailSpec(id: id, rootDirectory: root, uid: config.uid, gid: config.gid, keepFds: [0, 1, 2],
                                cgroups: made,
                                rlimits: JailRlimits(openFiles: request.openFiles, fileSize: request.fileSizeLimit, processes: request.processLimit),
                                userNamespace: request.userNamespace)
            try spec.validate()
            undo.disarm()
            return PreparedJail(supervisor: self, id: id, directory: directory, spec: spec, ownerLock: lock)
        } catch {
            undo.run()
            throw error
        }
    }

    /// Removes the jails of supervisors that are gone (their owner lock is
    /// free): kills what is left in their cgroups, removes the cgroups and
    /// directories. Returns the ids it removed.
    @discardableResult
    public func sweep() throws(JailError) -> [String] {
        guard FileIO.isDirectory(config.jailBase) else { return [] }
        let global = try GlobalLock(base: config.jailBase, exclusive: true)
        defer { global.release() }
        var removed: [String] = []
        var problems: [String] = []
        for id in try FileIO.list(config.jailBase) where !id.hasPrefix(".") {
            let directory = Cgroups.join(config.jailBase, id)
            guard FileIO.isDirectory(directory) else { continue }
            let lockPath = Cgroups.join(directory, "owner.lock")
            let fd = open(lockPath, O_RDWR | O_CLOEXEC)
            if fd >= 0 {
                defer { close(fd) }
                if flock(fd, LOCK_EX | LOCK_NB) != 0 { continue }  // its supervisor is alive
            }
            let cgroupList = (try? FileIO.read(Cgroups.join(directory, "cgroups"))) ?? ""
            do throws(JailError) {
                try Self.removeJail(directory: directory,
                                    cgroups: cgroupList.split(separator: "\n").map(String.init).filter(FileIO.isDirectory))
                removed.append(id)
            } catch {
                problems.append("\(id): \(error)")
            }
        }
        if !problems.isEmpty { throw .cleanup(problems) }
        return removed
    }

    /// Removes the (empty) parent groups the VMs' groups were made in, so a
    /// service manager can remove the supervisor's own group after it exits
    /// (on v1 they nest inside it). Call it when the supervisor shuts down;
    /// a parent that still holds a VM's group is left alone.
    public func removeEmptyCgroupParents() {
        for parent in cgroupParents { rmdir(parent) }
    }

    /// Kill, then remove: cgroups first (so nothing of the VM runs on), then
    /// the jail directory. Everything is attempted; what failed is reported.
    static func removeJail(directory: String, cgroups: [String]) throws(JailError) {
        var left: [String] = []
        if !Cgroups.killAll(cgroups) {
            left.append("processes that survive SIGKILL in \(cgroups.joined(separator: ", "))")
        }
        do { try Cgroups.remove(cgroups) } catch {
            if case let .cleanup(items) = error { left += items } else { left.append("\(error)") }
        }
        let root = Cgroups.join(directory, "root")
        if FileIO.exists(root), rmdir(root) != 0 {
            // The jail's mounts live in its own namespace and die with it; a
            // mount here would be a bug, but must not keep the directory.
            if errno == EBUSY { _ = airlock_jail_umount2(root, AIRLOCK_MNT_DETACH) }
            if rmdir(root) != 0 && errno != ENOENT {
                left.append("directory \(root) (\(String(cString: strerror(errno))))")
            }
        }
        for name in ["cgroups", "owner.lock"] {
            let path = Cgroups.join(directory, name)
            if unlink(path) != 0 && errno != ENOENT { left.append("file \(path) (\(String(cString: strerror(errno))))") }
        }
        if rmdir(directory) != 0 && errno != ENOENT {
            left.append("directory \(directory) (\(String(cString: strerror(errno)))): remove what is in it by hand")
        }
        if !left.isEmpty { throw .cleanup(left) }
    }

    /// The base directory's lock: shared while a jail is made or removed,
    /// exclusive while sweeping, so a sweep never sees a half-made jail.
    struct GlobalLock {
        let fd: Int32
        init(base: String, exclusive: Bool) throws(JailError) {
            let path = Cgroups.join(base, ".lock")
            fd = try jailCall("open", path) { open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600) }
            let op = exclusive ? LOCK_EX : LOCK_SH
            let descriptor = fd
            do throws(JailError) { _ = try jailCall("flock", path) { flock(descriptor, op) } } catch {
                close(descriptor)
                throw error
            }
        }
        func release() { close(fd) }
    }

    /// Undo list for a failed prepare.
    struct Cleanup {
        var files: [String] = []
        var directories: [String] = []
        var cgroups: [String] = []
        private var armed = true
        mutating func disarm() { armed = false }
        func run() {
            guard armed else { return }
            try? Cgroups.remove(cgroups)
            for f in files { unlink(f) }
            for d in directories { rmdir(d) }
        }
    }
}

/// One VM's jail, made and not yet removed.
public final class PreparedJail: Sendable {
    public let id: String
    /// <base>/<id>.
    public let directory: String
    /// What `spawn` hands the child (keepFds and lifeline filled in there).
    public let spec: JailSpec
    /// The VM's cgroup directories, for reading its limits and usage.
    public var cgroupDirectories: [String] { spec.cgroups }

    private let supervisor: JailSupervisor
    private let ownerLock: Mutex<OwnedFileDescriptor?>

    init(supervisor: JailSupervisor, id: String, directory: String, spec: JailSpec, ownerLock: OwnedFileDescriptor) {
        self.supervisor = supervisor
        self.id = id
        self.directory = directory
        self.spec = spec
        self.ownerLock = Mutex(ownerLock)
    }

    deinit { try? destroy() }

    /// Reads a file of the VM's cgroup ("memory.limit_in_bytes", "pids.max"),
    /// from whichever of its directories has it.
    public func cgroupFile(_ name: String) -> String? {
        for dir in spec.cgroups {
            if let text = try? FileIO.read(Cgroups.join(dir, name)) { return text.trimmingSuffix("\n") }
        }
        return nil
    }

    /// Starts `executable` with `arguments` as the jailed child: descriptors
    /// `fds` (child number: supervisor's descriptor) and nothing else, the
    /// spec on a pipe of its own (for `Jail.enter()`, which reads and closes
    /// it), Swift's crash backtracer off (it would exec, which seccomp
    /// forbids, and turn a crash into a sandbox violation), default signal
    /// handling, and a lifeline: when the returned `JailedChild` goes away,
    /// or this process dies, the VM ends.
    public func spawn(executable: String, arguments: [String], fds: [Int32: Int32] = [0: 0, 1: 1, 2: 2],
                      environment: [String] = []) throws(JailError) -> JailedChild {
        guard ownerLock.withLock({ $0 != nil }) else {
            throw .invalid("jail '\(id)' was destroyed: prepare a new one for each VM")
        }
        var lifelinePipe: [Int32] = [-1, -1]
        _ = try jailCall("pipe2", "the lifeline") { airlock_jail_pipe(&lifelinePipe) }
        let lifelineRead = OwnedFileDescriptor(adopting: lifelinePipe[0])
        let lifelineWrite = OwnedFileDescriptor(adopting: lifelinePipe[1])
        let lifelineChildFd = max(2, fds.keys.max() ?? 2) + 1
        let specChildFd = lifelineChildFd + 1

        var spec = self.spec
        spec.keepFds = fds.keys.sorted()
        spec.lifelineFd = lifelineChildFd
        // RLIMIT_FSIZE bounds the offset of every write to a regular file,
        // output included: with output redirected to a file it would cut the
        // output off silently (PID 1 ignores SIGXFSZ). The limit is lifted
        // then; bounding output is the supervisor's job in that case.
        for parent in fds.values {
            var info = stat()
            if fstat(parent, &info) == 0, (info.st_mode & S_IFMT) == S_IFREG { spec.rlimits.fileSize = UInt64.max }
        }
        try spec.validate()

        // The spec fits a pipe's buffer (a few hundred bytes; the pipe holds 64 KiB), so it is
        // written whole now and the child reads it to EOF.
        let text = Array(spec.encoded().utf8)
        guard text.count < 60 << 10 else { throw .invalid("the jail spec is \(text.count) bytes, more than a pipe holds") }
        var specPipe: [Int32] = [-1, -1]
        _ = try jailCall("pipe2", "the jail spec") { airlock_jail_pipe(&specPipe) }
        let specRead = OwnedFileDescriptor(adopting: specPipe[0])
        do {
            let specWrite = OwnedFileDescriptor(adopting: specPipe[1])
            _ = try jailCall("write", "the jail spec") { text.withUnsafeBytes { Glibc.write(specWrite.rawValue, $0.baseAddress, $0.count) } }
        }

        let env = ["\(JailSpec.descriptorVariable)=\(specChildFd)", "SWIFT_BACKTRACE=enable=no"] + environment
        var childFds = spec.keepFds + [lifelineChildFd, specChildFd]
        var parentFds = spec.keepFds.map { fds[$0]! } + [lifelineRead.rawValue, specRead.rawValue]
        var pid: pid_t = 0
        let argv = [executable] + arguments
        let rc = withCStrings(argv) { argvPointers in
            withCStrings(env) { envPointers in
                airlock_jail_spawn(&pid, executable, argvPointers, envPointers, &parentFds, &childFds, Int32(childFds.count))
            }
        }
        guard rc == 0 else {
            throw .system(SystemError("posix_spawn", subject: executable, errno: rc), hint: "check that the airlock executable exists and is executable")
        }
        let pidfd = airlock_jail_pidfd_open(pid)
        guard pidfd >= 0 else {
            // Without a pidfd the child cannot be watched safely: end it now.
            let code = errno
            Glibc.kill(pid, SIGKILL)
            var status: Int32 = 0
            _ = airlock_jail_wait_status(pid, &status)
            throw .system(SystemError("pidfd_open", subject: "pid \(pid)", errno: code), hint: "Linux 5.3 or newer is needed")
        }
        return JailedChild(pid: pid, pidfd: OwnedFileDescriptor(adopting: pidfd), lifeline: lifelineWrite)
    }

    /// Lets go of the jail without removing it, as a supervisor's death does
    /// (its owner lock is released): what `JailSupervisor.sweep` is for. Tests only.
    func abandon() {
        ownerLock.withLock { $0 = nil }
    }

    /// Kills whatever still runs in the VM's cgroups, removes them and the
    /// jail directory. Safe to call more than once; call it after the child
    /// has been waited for (or killed), including when it timed out.
    public func destroy() throws(JailError) {
        guard let lock = ownerLock.withLock({ l -> OwnedFileDescriptor? in let v = l; l = nil; return v }) else { return }
        let global = try JailSupervisor.GlobalLock(base: supervisor.config.jailBase, exclusive: false)
        defer {
            global.release()
            withExtendedLifetime(lock) {}  // the owner lock is held until everything is gone
        }
        try JailSupervisor.removeJail(directory: directory, cgroups: spec.cgroups)
    }
}

/// How the jailed child ended.
public enum JailExit: Sendable, Equatable, CustomStringConvertible {
    case exited(Int32)
    case signaled(Int32)

    /// A seccomp filter stopped a system call (see `Seccomp`).
    public var isSeccompViolation: Bool { self == .exited(JailExitCode.seccompViolation) }

    public var description: String {
        switch self {
        case let .exited(code) where code == JailExitCode.seccompViolation:
            return "the VMM broke its seccomp policy (exit status \(code)): a sandbox failure"
        case let .exited(code) where code == JailExitCode.setupFailed:
            return "the jail could not be set up (exit status \(code))"
        case let .exited(code): return "exited with status \(code)"
        case let .signaled(signal): return "killed by signal \(signal) (\(String(cString: strsignal(signal))))"
        }
    }
}

/// The spawned child (stage 1 of the jail; the VMM is its child).
public final class JailedChild: Sendable {
    public let pid: pid_t
    private let pidfd: OwnedFileDescriptor
    private let lifeline: Mutex<OwnedFileDescriptor?>
    private let result = Mutex<JailExit?>(nil)

    init(pid: pid_t, pidfd: OwnedFileDescriptor, lifeline: OwnedFileDescriptor) {
        self.pid = pid
        self.pidfd = pidfd
        self.lifeline = Mutex(lifeline)
    }

    /// Ends the VM now (a timeout, a cancelled run): SIGTERM to the child,
    /// which SIGKILLs the VMM, reaps it, and dies of the SIGTERM. Follow it
    /// with `wait`.
    public func terminate() {
        kill(SIGTERM)
    }

    /// Sends `signal` to the child, never to a recycled pid. SIGTERM, SIGINT,
    /// SIGHUP and SIGQUIT end the VMM with SIGKILL and the child then dies
    /// of the signal sent. SIGKILL kills the child, and the VMM with it (its
    /// parent-death signal), but the VMM is then reaped by the host's init
    /// rather than by the child: prefer `terminate()`.
    public func kill(_ signal: Int32) {
        _ = airlock_jail_pidfd_send_signal(pidfd.rawValue, signal)
    }

    /// Waits for the child to exit and reaps it; nil when `timeout` seconds
    /// pass first (the child is still running then). One waiter at a time.
    public func wait(timeout: Double?) throws(JailError) -> JailExit? {
        if let done = result.withLock({ $0 }) { return done }
        let start = monotonicNanoseconds()
        while true {
            var remaining: Int32 = -1
            if let timeout {
                let elapsed = Double(monotonicNanoseconds() - start) / 1e9
                // Clamped: a timeout past poll's 24.8 days (or not finite) waits as long as poll can.
                let ms = max(0, (timeout - elapsed) * 1000).rounded(.up)
                remaining = ms.isFinite && ms < Double(Int32.max) ? Int32(ms) : Int32.max
            }
            var p = pollfd(fd: pidfd.rawValue, events: Int16(POLLIN), revents: 0)
            let n = poll(&p, 1, remaining)
            if n < 0 {
                if errno == EINTR { continue }
                throw .system(SystemError("poll", subject: "the jailed child's pidfd", errno: errno), hint: "")
            }
            if n == 0 { return nil }
            break
        }
        var status: Int32 = 0
        _ = try jailCall("waitpid", "pid \(pid)") { airlock_jail_wait_status(pid, &status) }
        let exit: JailExit = (status & 0x7F) == 0 ? .exited((status >> 8) & 0xFF) : .signaled(status & 0x7F)
        result.withLock { $0 = exit }
        lifeline.withLock { $0 = nil }
        return exit
    }

    /// Closes the supervisor's end of the lifeline without killing anything,
    /// as the supervisor's death does. Tests only.
    func closeLifeline() {
        lifeline.withLock { $0 = nil }
    }

    deinit {
        // Dropping the handle ends the VM (the lifeline closes), and reaps it.
        if result.withLock({ $0 }) == nil {
            lifeline.withLock { $0 = nil }
            terminate()
            var status: Int32 = 0
            _ = airlock_jail_wait_status(pid, &status)
        }
    }
}

extension String {
    func trimmingSuffix(_ suffix: String) -> String {
        var s = self
        while s.hasSuffix(suffix) { s.removeLast(suffix.count) }
        return s
    }
}

/// NULL-terminated C string arrays for posix_spawn.
func withCStrings<R>(_ strings: [String], _ body: (UnsafePointer<UnsafeMutablePointer<CChar>?>) -> R) -> R {
    var pointers: [UnsafeMutablePointer<CChar>?] = strings.map { strdup($0) }
    pointers.append(nil)
    defer { for p in pointers { free(p) } }
    return pointers.withUnsafeBufferPointer { body($0.baseAddress!) }
}
