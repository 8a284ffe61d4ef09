import AirlockOS
import CJailShim
#if canImport(Glibc)
import Glibc
#endif

/// Resource limits a VM's cgroup enforces on the whole jailed process tree.
public struct CgroupLimits: Sendable, Equatable {
    /// Memory (guest RAM plus the VMM's own), swap included where the host accounts it.
    public var memoryBytes: UInt64
    /// Tasks (processes and threads): the VMM's main thread, vCPUs, helpers, stage 1.
    public var tasks: UInt64
    /// CPU time as a number of CPUs (1.5 = 150 ms per 100 ms); nil for no quota.
    public var cpus: Double?

    public init(memoryBytes: UInt64, tasks: UInt64 = 64, cpus: Double? = nil) {
        self.memoryBytes = memoryBytes
        self.tasks = tasks
        self.cpus = cpus
    }
}

/// One mounted cgroup hierarchy, from /proc/self/mountinfo.
struct CgroupMount: Equatable, Sendable {
    var mountPoint: String
    /// The cgroup that is the mount's root (not "/" inside a cgroup namespace).
    var root: String
    /// v1: the controllers bound to the hierarchy; v2: empty (see cgroup.controllers).
    var controllers: [String]
    var isV2: Bool
}

/// Which hierarchy the jail uses for each controller.
enum CgroupLayout: Equatable, Sendable {
    case v2(CgroupMount)
    /// One mount per needed controller (co-mounted controllers share one).
    case v1([String: CgroupMount])
}

/// Finding the hierarchies, and creating, filling, emptying and removing a
/// VM's cgroup in them.
enum Cgroups {
    static let controllers = ["memory", "pids", "cpu"]

    /// Parses /proc/self/mountinfo text into its cgroup mounts.
    static func mounts(mountinfo: String) -> [CgroupMount] {
        var result: [CgroupMount] = []
        for line in mountinfo.split(separator: "\n") {
            let fields = line.split(separator: " ").map(String.init)
            guard let dash = fields.firstIndex(of: "-"), dash >= 6, fields.count >= dash + 4 else { continue }
            let fstype = fields[dash + 1]
            guard fstype == "cgroup" || fstype == "cgroup2" else { continue }
            let options = fields[dash + 3].split(separator: ",").map(String.init)
            result.append(CgroupMount(
                mountPoint: unescapeMountField(fields[4]), root: unescapeMountField(fields[3]),
                controllers: fstype == "cgroup" ? options.filter { controllers.contains($0) } : [],
                isV2: fstype == "cgroup2"))
        }
        return result
    }

    /// mountinfo writes space, tab, newline and backslash as \ooo.
    static func unescapeMountField(_ s: String) -> String {
        var out: [UInt8] = []
        let b = Array(s.utf8)
        var i = 0
        while i < b.count {
            if b[i] == UInt8(ascii: "\\"), i + 3 < b.count,
               let v = UInt8(String(decoding: b[(i + 1)...(i + 3)], as: UTF8.self), radix: 8) {
                out.append(v)
                i += 4
            } else {
                out.append(b[i])
                i += 1
            }
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// Picks v2 when a cgroup2 mount offers every controller the jail needs
    /// (its root's cgroup.controllers), v1 otherwise, or fails naming what is missing.
    static func layout(mounts: [CgroupMount], v2Controllers: (CgroupMount) -> [String]) throws(JailError) -> CgroupLayout {
        if let v2 = mounts.first(where: { $0.isV2 }), Set(controllers).isSubset(of: Set(v2Controllers(v2))) {
            return .v2(v2)
        }
        var byController: [String: CgroupMount] = [:]
        for c in controllers {
            if let m = mounts.first(where: { !$0.isV2 && $0.controllers.contains(c) }) { byController[c] = m }
        }
        let missing = controllers.filter { byController[$0] == nil }
        if missing.isEmpty { return .v1(byController) }
        let v2Note = mounts.first(where: { $0.isV2 }).map { " (the cgroup2 mount at \($0.mountPoint) offers only: \(v2Controllers($0).joined(separator: " ")))" } ?? ""
        throw .cgroupsUnavailable("no cgroup hierarchy offers the \(missing.joined(separator: ", ")) controller(s)\(v2Note): mount cgroup2 with them enabled (or the v1 hierarchies), or check 'mount | grep cgroup'")
    }

    /// The calling process's cgroup for a controller (v1) or in the unified
    /// hierarchy (v2), from /proc/self/cgroup text.
    static func ownPath(procSelfCgroup: String, controller: String?) -> String? {
        for line in procSelfCgroup.split(separator: "\n") {
            let parts = line.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false).map(String.init)
            guard parts.count == 3 else { continue }
            if let controller {
                if parts[1].split(separator: ",").contains(Substring(controller)) { return parts[2] }
            } else if parts[0] == "0" && parts[1].isEmpty {
                return parts[2]
            }
        }
        return nil
    }

    /// The directory under `mount` for cgroup `path` (as /proc/self/cgroup names it).
    static func directory(mount: CgroupMount, cgroupPath: String) -> String {
        var relative = cgroupPath
        if mount.root != "/", relative.hasPrefix(mount.root) { relative.removeFirst(mount.root.count) }
        return join(mount.mountPoint, relative)
    }

    static func join(_ a: String, _ b: String) -> String {
        let parts = (a.split(separator: "/") + b.split(separator: "/")).map(String.init)
        return "/" + parts.joined(separator: "/")
    }

    /// Parent directories the per-VM groups go under. v1 nests under the
    /// supervisor's own group in each hierarchy, so whatever limits the
    /// supervisor has also bound its VMs. v2 cannot (a group with processes
    /// cannot hand controllers to children), so the parent is a sibling of
    /// the supervisor's group: under the same ancestors, with their limits.
    static func parents(layout: CgroupLayout, procSelfCgroup: String, name: String) throws(JailError) -> [String] {
        switch layout {
        case let .v2(mount):
            let own = ownPath(procSelfCgroup: procSelfCgroup, controller: nil) ?? "/"
            var base = own
            if base != "/" {
                base = String(base[..<(base.lastIndex(of: "/") ?? base.startIndex)])
                if base.isEmpty { base = "/" }
            }
            return [join(directory(mount: mount, cgroupPath: base), name)]
        case let .v1(byController):
            var dirs: [String] = []
            for c in controllers {
                guard let mount = byController[c] else { continue }
                let own = ownPath(procSelfCgroup: procSelfCgroup, controller: c) ?? "/"
                let dir = join(directory(mount: mount, cgroupPath: own), name)
                if !dirs.contains(dir) { dirs.append(dir) }
            }
            return dirs
        }
    }

    /// Detects the host's layout from the live /proc files.
    static func detect() throws(JailError) -> CgroupLayout {
        let info = try FileIO.read("/proc/self/mountinfo")
        return try layout(mounts: mounts(mountinfo: info)) { m in
            ((try? FileIO.read(join(m.mountPoint, "cgroup.controllers"))) ?? "").split(whereSeparator: { $0 == " " || $0 == "\n" }).map(String.init)
        }
    }

    // MARK: One VM's cgroup

    /// Makes sure v2 hands the needed controllers down to `parent`'s children.
    static func enableV2Controllers(mount: CgroupMount, down to: String) throws(JailError) {
        var dir = mount.mountPoint
        let below = to.dropFirst(mount.mountPoint.count).split(separator: "/").map(String.init)
        for level in [""] + below {
            if !level.isEmpty { dir = join(dir, level) }
            let file = join(dir, "cgroup.subtree_control")
            let enabled = ((try? FileIO.read(file)) ?? "").split(whereSeparator: { $0 == " " || $0 == "\n" }).map(String.init)
            for c in controllers where !enabled.contains(c) {
                try FileIO.write(file, "+\(c)", hint: "cgroup v2 will not hand the \(c) controller to the groups under \(dir) (a group that holds processes cannot); point the jail at a cgroup whose parent delegates \(controllers.joined(separator: ", "))")
            }
        }
    }

    /// Creates the VM's group under each parent and writes its limits.
    /// The CPU limit, refused when it is not a positive finite number of CPUs (it becomes a quota in µs).
    static func checkedCPUs(_ cpus: Double?) throws(JailError) -> Double? {
        guard let cpus else { return nil }
        guard cpus.isFinite, cpus > 0, cpus <= 4096 else {
            throw .invalid("a CPU limit of \(cpus) is not a positive number of CPUs (at most 4096)")
        }
        return cpus
    }

    static func create(layout: CgroupLayout, parents: [String], id: String, limits: CgroupLimits) throws(JailError) -> [String] {
        var made: [String] = []
        do throws(JailError) {
            for parent in parents {
                try FileIO.makeDirectories(parent, mode: 0o755, hint: "the jail's cgroups need root and a writable cgroup hierarchy")
                if case let .v2(mount) = layout { try enableV2Controllers(mount: mount, down: parent) }
                let dir = join(parent, id)
                if mkdir(dir, 0o755) != 0 {
                    throw JailError.system(SystemError("mkdir", subject: dir, errno: errno),
                                           hint: errno == EEXIST ? "a VM with id '\(id)' exists already (or a crashed run left it: JailSupervisor.sweep removes those)" : "")
                }
                made.append(dir)
            }
            try writeLimits(layout: layout, dirs: made, limits: limits)
        } catch {
            try? remove(made)
            throw error
        }
        return made
    }

    static func writeLimits(layout: CgroupLayout, dirs: [String], limits: CgroupLimits) throws(JailError) {
        func file(_ name: String) -> String? {
            dirs.map { join($0, name) }.first(where: FileIO.exists)
        }
        func set(_ name: String, _ value: String) throws(JailError) {
            guard let path = file(name) else {
                throw .cgroupsUnavailable("the VM's cgroups (\(dirs.joined(separator: ", "))) have no \(name): the host's cgroup hierarchy lacks a controller the jail needs")
            }
            try FileIO.write(path, value)
        }
        let quotaPeriod: UInt64 = 100_000
        switch layout {
        case .v2:
            try set("memory.max", String(limits.memoryBytes))
            if file("memory.swap.max") != nil { try set("memory.swap.max", "0") }
            try set("pids.max", String(limits.tasks))
            if let cpus = try Self.checkedCPUs(limits.cpus) {
                try set("cpu.max", "\(max(1000, UInt64(cpus * Double(quotaPeriod)))) \(quotaPeriod)")
            }
        case .v1:
            try set("memory.limit_in_bytes", String(limits.memoryBytes))
            // With swap accounting on, memsw bounds memory plus swap; it must
            // be at least the memory limit, so it is written second.
            if file("memory.memsw.limit_in_bytes") != nil { try set("memory.memsw.limit_in_bytes", String(limits.memoryBytes)) }
            try set("pids.max", String(limits.tasks))
            if let cpus = try Self.checkedCPUs(limits.cpus) {
                try set("cpu.cfs_period_us", String(quotaPeriod))
                try set("cpu.cfs_quota_us", String(max(1000, UInt64(cpus * Double(quotaPeriod)))))
            }
        }
    }

    /// The pids in a group (host pid namespace).
    static func processes(in dir: String) -> [pid_t] {
        guard let text = try? FileIO.read(join(dir, "cgroup.procs")) else { return [] }
        return text.split(separator: "\n").compactMap { pid_t($0) }
    }

    /// SIGKILLs every process in the groups until they are empty, without
    /// ever signalling a recycled pid: each pid is pinned with a pidfd and
    /// signalled only if it is still in the group after pinning.
    ///
    /// Children go first (the VMM before stage 1), so stage 1 can still reap
    /// the VMM: killing stage 1 first would leave the VMM a zombie for the
    /// host's init to collect, which some container inits never do.
    static func killAll(_ dirs: [String], timeoutMilliseconds: Int = 3000) -> Bool {
        var waited = 0
        var round = 0
        while true {
            var members: [(dir: String, pid: pid_t)] = []
            for dir in dirs {
                // v2's cgroup.kill does it atomically, new forks included.
                if FileIO.exists(join(dir, "cgroup.kill")) { try? FileIO.write(join(dir, "cgroup.kill"), "1") }
                for pid in processes(in: dir) where !members.contains(where: { $0.pid == pid }) { members.append((dir, pid)) }
            }
            if members.isEmpty { return true }
            if waited >= timeoutMilliseconds { return false }
            let pids = Set(members.map(\.pid))
            // The first rounds spare the processes whose parent is outside
            // the group (stage 1), as long as they have children inside.
            let children = members.filter { parent(of: $0.pid).map(pids.contains) ?? false }
            let targets = (round < 50 && !children.isEmpty) ? children : members
            for (dir, pid) in targets {
                let pidfd = airlock_jail_pidfd_open(pid)
                guard pidfd >= 0 else { continue }  // already gone
                if processes(in: dir).contains(pid) { _ = airlock_jail_pidfd_send_signal(pidfd, SIGKILL) }
                close(pidfd)
            }
            sleepMilliseconds(2)
            waited += 2
            round += 1
        }
    }

    /// The parent pid from /proc/<pid>/stat (after the command's closing parenthesis).
    static func parent(of pid: pid_t) -> pid_t? {
        guard let stat = try? FileIO.read("/proc/\(pid)/stat"), let close = stat.lastIndex(of: ")") else { return nil }
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        return fields.count > 1 ? pid_t(fields[1]) : nil
    }

    /// Removes the groups (they must be empty); returns what could not be removed.
    static func remove(_ dirs: [String], timeoutMilliseconds: Int = 3000) throws(JailError) {
        var left: [String] = []
        for dir in dirs {
            var waited = 0
            while rmdir(dir) != 0 {
                let code = errno
                if code == ENOENT { break }
                // EBUSY: a killed task has not finished leaving yet.
                if code == EBUSY && waited < timeoutMilliseconds {
                    sleepMilliseconds(2)
                    waited += 2
                    continue
                }
                left.append("cgroup \(dir) (\(String(cString: strerror(code))); processes: \(processes(in: dir).map(String.init).joined(separator: " ")))")
                break
            }
        }
        if !left.isEmpty { throw .cleanup(left) }
    }

    /// Moves the calling process into every group (Jail.enter, stage 0).
    static func join(_ dirs: [String]) throws(JailError) {
        let me = String(getpid())
        for dir in dirs {
            try FileIO.write(join(dir, "cgroup.procs"), me, hint: "the jailed process must start as root to join its cgroup")
        }
    }
}
