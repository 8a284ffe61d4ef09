import AirlockOS
import CJailShim
#if canImport(Glibc)
import Glibc
#endif

/// What Jail.enter hands the VMM: it is inside the jail, unprivileged, with
/// only the descriptors its spec kept.
public struct JailedProcess: Sendable {
    public let spec: JailSpec
}

/// The jailed side: turns the freshly spawned, single-threaded child into
/// the VMM's sandbox. See docs/security.md for what each step stops.
public enum Jail {
    /// `enter(_:)` with the spec the supervisor wrote on the descriptor that
    /// `JailSpec.descriptorVariable` names (`PreparedJail.spawn` does both).
    /// The descriptor is read to its end and closed before anything else.
    public static func enter() throws(JailError) -> JailedProcess {
        guard let raw = getenv(JailSpec.descriptorVariable), let fd = Int32(String(cString: raw)), fd > 2 else {
            throw .invalid("\(JailSpec.descriptorVariable) does not name a descriptor: this process must be started by PreparedJail.spawn")
        }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if n > 0 { bytes += chunk[0..<n]; if bytes.count > 1 << 20 { break }; continue }
            if n < 0 && errno == EINTR { continue }
            break
        }
        close(fd)
        guard bytes.count <= 1 << 20 else { throw .invalid("the jail spec on descriptor \(fd) is over 1 MiB: it is not one PreparedJail.spawn wrote") }
        return try enter(try JailSpec(decoding: String(decoding: bytes, as: UTF8.self)))
    }

    /// Enters the jail. Call it first thing in the child, before any thread
    /// exists. In order:
    ///
    /// 1. closes every descriptor but `keepFds` (and the lifeline), clears the
    ///    environment, sets RLIMIT_NOFILE, RLIMIT_FSIZE, RLIMIT_CORE = 0 and
    ///    RLIMIT_NPROC (when given);
    /// 2. joins the VM's cgroups;
    /// 3. unshares the mount, PID, IPC, UTS, network and cgroup namespaces
    ///    (and the user namespace first, when asked) and forks: the parent
    ///    (stage 1) never returns from here; it waits for the child and exits
    ///    with its status, turning SIGTERM, SIGINT, SIGHUP and SIGQUIT into a
    ///    SIGKILL of the VMM and the supervisor's disappearance (lifeline EOF)
    ///    too;
    /// 4. the child (stage 2, PID 1 of the new PID namespace) makes every
    ///    mount private, mounts a small empty tmpfs on the jail directory,
    ///    pivots into it and detaches the old root, and remounts the new root
    ///    read-only: the jail holds nothing (no files, no /dev), because the
    ///    VMM gets everything it uses as descriptors;
    /// 5. drops to the jail's uid and gid with no
    ///    supplementary groups, empties every capability set (bounding and
    ///    ambient included), locks the secure bits, sets no_new_privs, and
    ///    asks for SIGKILL if stage 1 dies;
    /// 6. returns, in stage 2, inside the jail.
    ///
    /// Seccomp comes later, from the VMM (`Seccomp.install`), once its
    /// machine is built. An error thrown before the fork leaves the process
    /// partly jailed; the caller should print it and exit with
    /// `JailExitCode.setupFailed`.
    public static func enter(_ spec: JailSpec) throws(JailError) -> JailedProcess {
        try spec.validate()
        guard geteuid() == 0 else {
            throw .invalid("the jailed process runs as uid \(geteuid()), but building the jail needs root: start airlock as root")
        }
        let threads = (try? FileIO.list("/proc/self/task").count) ?? 1
        guard threads == 1 else { throw .multithreaded(threads: threads) }

        // Step 1: descriptors, environment, limits.
        // glibc reads the time zone on the first localtime call; doing it now,
        // while TZ and /etc/localtime are still visible, keeps log timestamps
        // in local time and keeps that file access out of the seccomp era.
        tzset()
        var keep = Set(spec.keepFds)
        if let lifeline = spec.lifelineFd { keep.insert(lifeline) }
        try closeAll(except: keep)
        _ = try jailCall("clearenv") { airlock_jail_clearenv() }
        try setLimits(spec.rlimits, highestFd: keep.max() ?? -1)

        // Step 2: the cgroups, while still root in the host's namespaces.
        try Cgroups.join(spec.cgroups)

        // Step 3: namespaces, then the fork into stages 1 and 2.
        if spec.userNamespace { try enterUserNamespace(spec) }
        let flags = AIRLOCK_CLONE_NEWNS | AIRLOCK_CLONE_NEWPID | AIRLOCK_CLONE_NEWIPC | AIRLOCK_CLONE_NEWUTS
            | AIRLOCK_CLONE_NEWNET | AIRLOCK_CLONE_NEWCGROUP
        _ = try jailCall("unshare", "the mount, PID, IPC, UTS, network and cgroup namespaces",
                         hint: "the kernel needs namespace support and the process CAP_SYS_ADMIN") { airlock_jail_unshare(flags) }
        // Stage 2 learns that stage 1 died from this pipe hanging up: its
        // parent-death signal can only be armed after the uid change.
        var deathPipe: [Int32] = [-1, -1]
        _ = try jailCall("pipe2") { airlock_jail_pipe(&deathPipe) }
        var savedMask = [UInt8](repeating: 0, count: Int(AIRLOCK_SIGSET_BYTES))
        let child = try jailCall("fork", hint: "the pids limit or memory may be exhausted") {
            savedMask.withUnsafeMutableBytes { airlock_jail_fork($0.baseAddress) }
        }
        if child > 0 {
            close(deathPipe[0])
            airlock_jail_stage1(child, spec.lifelineFd ?? -1, deathPipe[1],
                                JailExitCode.seccompViolation, JailExitCode.setupFailed)
        }
        close(deathPipe[1])
        if let lifeline = spec.lifelineFd { close(lifeline) }
        _ = savedMask.withUnsafeBytes { airlock_jail_restore_signals($0.baseAddress) }

        // Step 4: the jail's file system.
        _ = try jailCall("sethostname", spec.hostname) { airlock_jail_sethostname(spec.hostname) }
        try buildRoot(spec)
        try pivot(into: spec.rootDirectory)

        // Step 5: the drop.
        umask(0o077)
        try dropPrivileges(spec)
        _ = try jailCall("prctl(PR_SET_PDEATHSIG)") { airlock_jail_set_parent_death_kill() }
        if airlock_jail_pipe_hung_up(deathPipe[0]) != 0 {
            // Stage 1 died before the death signal was armed: nobody waits for us.
            _exit(JailExitCode.setupFailed)
        }
        close(deathPipe[0])
        return JailedProcess(spec: spec)
    }

    // MARK: Steps

    static func closeAll(except keep: Set<Int32>) throws(JailError) {
        var next: UInt32 = 0
        for fd in keep.sorted() {
            if UInt32(fd) > next { _ = try jailCall("close_range", hint: "Linux 5.9 or newer is needed") { airlock_jail_close_range(next, UInt32(fd) - 1) } }
            next = UInt32(fd) + 1
        }
        _ = try jailCall("close_range", hint: "Linux 5.9 or newer is needed") { airlock_jail_close_range(next, UInt32.max) }
        for fd in keep where fcntl(fd, F_GETFD) < 0 {
            throw .invalid("descriptor \(fd) is declared for the VMM but is not open: pass it to the child or drop it from keepFds")
        }
    }

    static func setLimits(_ limits: JailRlimits, highestFd: Int32) throws(JailError) {
        guard limits.openFiles > UInt64(max(highestFd, 2)) else {
            throw .invalid("RLIMIT_NOFILE \(limits.openFiles) does not cover the kept descriptor \(highestFd): raise openFiles")
        }
        func set(_ resource: Int32, _ name: String, _ value: UInt64) throws(JailError) {
            let v = value == UInt64.max ? rlim_t.max : rlim_t(value)  // rlim_t.max is RLIM_INFINITY
            var limit = rlimit(rlim_cur: v, rlim_max: v)
            _ = try jailCall("setrlimit(\(name))", String(value)) { setrlimit(__rlimit_resource_t(UInt32(resource)), &limit) }
        }
        try set(Int32(RLIMIT_NOFILE.rawValue), "RLIMIT_NOFILE", limits.openFiles)
        try set(Int32(RLIMIT_FSIZE.rawValue), "RLIMIT_FSIZE", limits.fileSize)
        try set(Int32(RLIMIT_CORE.rawValue), "RLIMIT_CORE", 0)
        if let processes = limits.processes { try set(Int32(__RLIMIT_NPROC.rawValue), "RLIMIT_NPROC", processes) }
    }

    /// A user namespace whose root is the jail's uid and gid outside. The
    /// maps must be written from outside the namespace, by a helper forked
    /// before the unshare.
    static func enterUserNamespace(_ spec: JailSpec) throws(JailError) {
        var go: Int32 = -1
        let helper = try jailCall("fork (uid map helper)") { airlock_jail_spawn_idmapper(spec.uid, spec.gid, &go) }
        let unshared = airlock_jail_unshare(AIRLOCK_CLONE_NEWUSER)
        let unshareErrno = errno
        var byte: UInt8 = 1
        _ = Glibc.write(go, &byte, unshared == 0 ? 1 : 0)
        close(go)
        var status: Int32 = 0
        _ = try jailCall("waitpid (uid map helper)") { airlock_jail_wait_status(helper, &status) }
        guard unshared == 0 else {
            throw .system(SystemError("unshare", subject: "a user namespace", errno: unshareErrno),
                          hint: "user namespaces may be disabled (user.max_user_namespaces); run without userNamespace")
        }
        guard status == 0 else {
            throw .invalid("writing the user namespace's uid_map/gid_map (0 -> \(spec.uid)/\(spec.gid)) failed: the supervisor must be root in the host's user namespace")
        }
        // Become the namespace's root (the jail uid outside) for the set-up:
        // files made in the jail's tmpfs need an owner the namespace maps.
        _ = try jailCall("setresgid(0) in the user namespace") { airlock_jail_setresgid(0) }
        _ = try jailCall("setgroups") { airlock_jail_setgroups_none() }
        _ = try jailCall("setresuid(0) in the user namespace") { airlock_jail_setresuid(0) }
    }

    static func buildRoot(_ spec: JailSpec) throws(JailError) {
        let root = spec.rootDirectory
        // Nothing mounted from here on may reach the host's mount table.
        _ = try jailCall("mount", "/ (making every mount private)") {
            airlock_jail_mount(nil, "/", nil, AIRLOCK_MS_REC | AIRLOCK_MS_PRIVATE, nil)
        }
        // An empty tmpfs, so the jail's root lives and dies with its mount namespace.
        _ = try jailCall("mount tmpfs on", root, hint: "JailSupervisor.prepare creates this directory; was it removed?") {
            airlock_jail_mount("airlock-jail", root, "tmpfs", AIRLOCK_MS_NOSUID | AIRLOCK_MS_NOEXEC | AIRLOCK_MS_NODEV, "mode=0755,size=64k,nr_inodes=16")
        }
    }

    /// pivot_root(".", ".") stacks the old root under the new one, so no
    /// directory for it is needed; detaching it leaves only the jail.
    static func pivot(into root: String) throws(JailError) {
        _ = try jailCall("chdir", root) { chdir(root) }
        _ = try jailCall("pivot_root", root) { airlock_jail_pivot_root(".", ".") }
        _ = try jailCall("umount", "the old root") { airlock_jail_umount2(".", AIRLOCK_MNT_DETACH) }
        _ = try jailCall("chdir", "/") { chdir("/") }
        let inherited = UInt(try jailCall("statvfs", "the jail root") { airlock_jail_mount_flags_of("/") })
        _ = try jailCall("remount", "the jail root read-only") {
            airlock_jail_mount(nil, "/", nil, AIRLOCK_MS_BIND | AIRLOCK_MS_REMOUNT | AIRLOCK_MS_RDONLY | AIRLOCK_MS_NOSUID | AIRLOCK_MS_NOEXEC | inherited, nil)
        }
    }

    static func dropPrivileges(_ spec: JailSpec) throws(JailError) {
        try Capabilities.dropBoundingAndAmbient()
        // In a user namespace the process stays its root, which is the jail
        // uid outside; it keeps no capability there either.
        let uid = spec.userNamespace ? 0 : spec.uid
        let gid = spec.userNamespace ? 0 : spec.gid
        _ = try jailCall("setgroups", "(none)") { airlock_jail_setgroups_none() }
        _ = try jailCall("setresgid", String(gid)) { airlock_jail_setresgid(gid) }
        _ = try jailCall("setresuid", String(uid)) { airlock_jail_setresuid(uid) }
        try Capabilities.clearProcessSets()
        _ = try jailCall("prctl(PR_SET_NO_NEW_PRIVS)") { airlock_jail_set_no_new_privs() }
        // Not dumpable: no core, and /proc/1/* of the VMM belongs to root, so
        // even a same-uid process could not ptrace or read its memory.
        _ = try jailCall("prctl(PR_SET_DUMPABLE)") { airlock_jail_set_dumpable(0) }
    }
}
