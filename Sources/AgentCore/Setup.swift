import AgentProtocol
import Glibc

/// The filesystems a command expects. Each mount is one system call (a
/// shell's `mount -a` would be a fork and an exec, seconds of emulated kernel
/// work on a PVM host). A failure is reported on the console and the agent
/// goes on: a command may well not need /sys.
enum Mounts {
    struct Entry {
        let source: String, target: String, type: String, flags: UInt, options: String?
        let mode: mode_t
    }

    static let table: [Entry] = [
        Entry(source: "proc", target: "/proc", type: "proc", flags: UInt(MS_NOSUID | MS_NODEV | MS_NOEXEC), options: nil, mode: 0o555),
        Entry(source: "sysfs", target: "/sys", type: "sysfs", flags: UInt(MS_NOSUID | MS_NODEV | MS_NOEXEC), options: nil, mode: 0o555),
        // The kernel mounts devtmpfs itself when the root is a disk (CONFIG_DEVTMPFS_MOUNT); EBUSY then.
        Entry(source: "devtmpfs", target: "/dev", type: "devtmpfs", flags: UInt(MS_NOSUID), options: "mode=755", mode: 0o755),
        Entry(source: "tmpfs", target: "/dev/shm", type: "tmpfs", flags: UInt(MS_NOSUID | MS_NODEV), options: "mode=1777", mode: 0o1777),
        Entry(source: "tmpfs", target: "/tmp", type: "tmpfs", flags: UInt(MS_NOSUID | MS_NODEV), options: "mode=1777", mode: 0o1777),
        Entry(source: "tmpfs", target: "/run", type: "tmpfs", flags: UInt(MS_NOSUID | MS_NODEV), options: "mode=755", mode: 0o755),
    ]

    static func setUp() {
        for e in table {
            // Already there: the kernel mounted devtmpfs (and the early constructor /proc). Asking
            // again costs most of a second of emulated kernel work on a PVM host just to hear EBUSY.
            if e.type == "devtmpfs" && Sys.pathKind("/dev/null") != .missing { continue }
            if e.type == "proc" && Sys.pathKind("/proc/self/exe") != .missing { continue }
            // The root is read-only: a missing mount point cannot be created, and mkdir says so (EROFS); mount then reports it.
            if !Sys.isDirectory(e.target) { _ = mkdir(e.target, e.mode) }
            let rc: Int32
            if let options = e.options {
                rc = mount(e.source, e.target, e.type, e.flags, options)
            } else {
                rc = mount(e.source, e.target, e.type, e.flags, nil)
            }
            if rc != 0 && errno != EBUSY {
                Agent.console("mount \(e.type) on \(e.target): \(Sys.errorText(errno))")
            }
        }
    }
}

/// Finds the agent's virtio-console ports by name. The host announces them
/// over the console's control queue; the guest driver creates them from a
/// workqueue, so at PID 1's start they may not exist yet and are polled for.
enum Ports {
    struct Opened { let control: Int32, stdout: Int32, stderr: Int32 }

    /// The environment variable through which the host names the port devices
    /// (`vport1p0,vport1p1,vport1p2`: control, stdout, stderr). The kernel hands
    /// unknown NAME=value parameters of its command line to init's environment.
    static let hintVariable = "AIRLOCK_PORTS"

    static func open(waitMilliseconds: Int) -> Result<Opened, AgentError> {
        let deadline = Sys.monotonicMilliseconds() + waitMilliseconds
        // The hint saves scanning sysfs (a directory listing and a read per port, seconds of
        // emulated kernel work on a PVM host). The host derives it from the order it added its
        // virtio devices, which is the order the guest numbers them; a wrong hint fails to
        // open, or shows as a hello on the wrong port, which the host reports.
        if let hint = getenv(hintVariable).map({ String(cString: $0) }) {
            let names = hint.split(separator: ",").map(String.init)
            if names.count == 3 {
                while Sys.monotonicMilliseconds() < deadline {
                    let fds = names.map { Glibc.open("/dev/" + $0, O_RDWR | O_CLOEXEC | O_NONBLOCK) }
                    if fds.allSatisfy({ $0 >= 0 }) { return .success(Opened(control: fds[0], stdout: fds[1], stderr: fds[2])) }
                    for fd in fds where fd >= 0 { close(fd) }
                    // Not created yet (the driver adds ports from a workqueue), or not ours: scan below once.
                    if Sys.pathKind("/sys/class/virtio-ports/" + names[0]) != .missing { break }
                    Sys.sleep(milliseconds: 5)
                }
            }
        }
        while true {
            let found = scan()
            if let c = found[AgentProtocol.controlPortName], let o = found[AgentProtocol.stdoutPortName],
               let e = found[AgentProtocol.stderrPortName] {
                let fds = [c, o, e].map { Glibc.open("/dev/" + $0, O_RDWR | O_CLOEXEC | O_NONBLOCK) }
                if fds.allSatisfy({ $0 >= 0 }) { return .success(Opened(control: fds[0], stdout: fds[1], stderr: fds[2])) }
                // devtmpfs may not have the nodes yet; try again.
                for fd in fds where fd >= 0 { close(fd) }
            }
            if Sys.monotonicMilliseconds() > deadline {
                let names = found.keys.sorted().joined(separator: ", ")
                return .failure(.fatal("no \(AgentProtocol.portNames.joined(separator: "/")) virtio-console ports after \(waitMilliseconds / 1000) s (found: \(names.isEmpty ? "none" : names)): this guest was not started by 'airlock run'"))
            }
            Sys.sleep(milliseconds: 5)
        }
    }

    /// Port name to device name (vportNpM), from /sys/class/virtio-ports.
    static func scan() -> [String: String] {
        var found: [String: String] = [:]
        for device in Sys.listDirectory("/sys/class/virtio-ports") {
            guard let name = Sys.readFile("/sys/class/virtio-ports/\(device)/name", limit: 256) else { continue }
            let trimmed = name.hasSuffix("\n") ? String(name.dropLast()) : name
            found[trimmed] = device
        }
        return found
    }
}

/// The disks the host attached, mounted where it said (`GuestMount`, from the
/// kernel command line): the workspace read-write, `--disk` images read-only
/// or read-write, and a tmpfs where their mount points need one. A failure is
/// kept: the agent then refuses to run commands, since a command that finds
/// an empty directory where its workspace should be would fail obscurely.
enum DiskMounts {
    /// How long a disk's device node may take to appear (the virtio-blk probe
    /// runs before init; devtmpfs may lag it).
    static let deviceWaitMilliseconds = 5_000

    /// Mounts everything asked for, in order; returns what was mounted (for
    /// unmounting at the end) and what failed.
    static func setUp() -> (mounted: [GuestMount], failures: [String]) {
        guard let raw = getenv(GuestMount.variable) else { return ([], []) }
        let mounts: [GuestMount]
        do { mounts = try GuestMount.decode(String(cString: raw)) } catch {
            return ([], ["the host's \(GuestMount.variable) is unreadable: \(error)"])
        }
        var mounted: [GuestMount] = [], failures: [String] = []
        for m in mounts {
            if let problem = mount(m) {
                failures.append(problem)
                Agent.console(problem)
            } else {
                mounted.append(m)
            }
        }
        return (mounted, failures)
    }

    /// Gives the trees of `ownedByRunUser` mounts to a run's user, once per user:
    /// a workspace copied from the host carries the host's owners, which would leave
    /// a command run as `--user` unable to write its own workspace. Links are changed
    /// themselves (never followed); other mounts inside the tree are not entered.
    /// nil on success, else the first failure.
    static func give(_ mounts: [GuestMount], to creds: Credentials, done: inout [String: UInt32]) -> String? {
        for m in mounts where m.ownedByRunUser && done[m.target] != creds.uid {
            var device = stat()
            guard lstat(m.target, &device) == 0 else { return "\(m.target): \(Sys.errorText(errno))" }
            if let problem = chownTree(m.target, uid: creds.uid, gid: creds.gid, device: device.st_dev, depth: 0) { return problem }
            done[m.target] = creds.uid
        }
        return nil
    }

    private static func chownTree(_ path: String, uid: UInt32, gid: UInt32, device: UInt, depth: Int) -> String? {
        guard fchownat(AT_FDCWD, path, uid, gid, AT_SYMLINK_NOFOLLOW) == 0 else { return "chown \(path): \(Sys.errorText(errno))" }
        var info = stat()
        guard lstat(path, &info) == 0, info.st_mode & S_IFMT == S_IFDIR, info.st_dev == device, depth < 4096 else { return nil }
        for name in Sys.listDirectory(path) where !(depth == 0 && name == "lost+found") {
            if let problem = chownTree(path + "/" + name, uid: uid, gid: gid, device: device, depth: depth + 1) { return problem }
        }
        return nil
    }

    /// nil when mounted, else what went wrong.
    static func mount(_ m: GuestMount) -> String? {
        if !Sys.isDirectory(m.target), let problem = makeDirectories(m.target) {
            return "cannot create mount point \(m.target): \(problem)"
        }
        var flags = UInt(MS_NOSUID | MS_NODEV)
        if m.readOnly { flags |= UInt(MS_RDONLY) }
        switch m.source {
        case .tmpfs:
            guard Glibc.mount("tmpfs", m.target, "tmpfs", flags, "mode=755") == 0 else {
                return "mounting a tmpfs on \(m.target): \(Sys.errorText(errno))"
            }
        case let .disk(name):
            let device = "/dev/" + name
            let deadline = Sys.monotonicMilliseconds() + deviceWaitMilliseconds
            while Sys.pathKind(device) == .missing && Sys.monotonicMilliseconds() < deadline { Sys.sleep(milliseconds: 5) }
            // noinit_itable: the workspace's inode tables were never written (they are zero in
            // a sparse file), and zeroing them in the background is emulated kernel work for nothing.
            let rc = Glibc.mount(device, m.target, "ext4", flags, m.readOnly ? "noload" : "noinit_itable")
            guard rc == 0 else {
                return "mounting \(device) (ext4) on \(m.target)\(m.readOnly ? " read-only" : ""): \(Sys.errorText(errno))"
            }
        }
        return nil
    }

    /// mkdir -p; nil on success.
    static func makeDirectories(_ path: String) -> String? {
        var prefix = ""
        for component in path.split(separator: "/") {
            prefix += "/" + component
            if Sys.isDirectory(prefix) { continue }
            if mkdir(prefix, 0o755) != 0 && errno != EEXIST { return "\(prefix): \(Sys.errorText(errno))" }
        }
        return nil
    }

    /// After `sync`: unmounts in reverse order, so disks the guest wrote are left
    /// clean (a busy one stays mounted; sync has already written its data).
    static func tearDown(_ mounted: [GuestMount]) {
        for m in mounted.reversed() { _ = umount2(m.target, 0) }
    }
}
