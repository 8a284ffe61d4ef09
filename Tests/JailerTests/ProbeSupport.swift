import AirlockOS
import CJailShim
@testable import Jailer
import Synchronization
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// Jailed tests need root (namespaces, mounts, cgroups): without it they
/// fail, saying so, rather than pass by skipping.
func requireRoot() throws {
    try #require(geteuid() == 0, "JailerTests' jail tests must run as root: they build real jails (run 'swift test' as root)")
}

/// One supervisor for the whole test process, on its own base directory and
/// cgroup parent so it never touches a real Airlock's jails. The names are
/// fixed, so runs of the suite reuse them (the base directory and the empty
/// parent groups stay, as /run/airlock/jail and "airlock" do for real runs).
enum TestJails {
    static let config: JailSupervisorConfig = {
        var c = JailSupervisorConfig()
        c.jailBase = "/run/airlock-test/jail"
        c.cgroupParentName = "airlock-test"
        c.uid = 2_000_000_123
        c.gid = 2_000_000_124
        return c
    }()

    /// The probe executable, built beside the test bundle.
    static let probePath: String = {
        var buffer = [CChar](repeating: 0, count: 4096)
        let n = readlink("/proc/self/exe", &buffer, buffer.count - 1)
        let exe = n > 0 ? String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) : ""
        var dir = exe
        while !dir.isEmpty, !FileIO.exists(dir + "/airlock-jail-probe") {
            dir = String(dir[..<(dir.lastIndex(of: "/") ?? dir.startIndex)])
        }
        return dir + "/airlock-jail-probe"
    }()

    static func request(memory: UInt64 = 96 << 20, tasks: UInt64 = 16, cpus: Double? = 0.5,
                        userNamespace: Bool = false, fileSizeLimit: UInt64 = 1 << 20) -> JailRequest {
        JailRequest(limits: CgroupLimits(memoryBytes: memory, tasks: tasks, cpus: cpus), fileSizeLimit: fileSizeLimit,
                    userNamespace: userNamespace)
    }

    /// The host's /dev/kvm, opened by the test as Airlock's supervisor opens it, for the probe's fd 3.
    static let kvm: OwnedFileDescriptor = OwnedFileDescriptor(adopting: open("/dev/kvm", O_RDWR | O_CLOEXEC))

    static let supervisor: JailSupervisor = try! JailSupervisor(config: config)

    static func uniqueID(_ tag: String) -> String {
        counter.withLock { n in n += 1; return "\(tag)-\(getpid())-\(n)" }
    }
    private static let counter = Mutex(0)
}

/// A pipe the test reads from (the child's stdout or stderr).
final class PipeReader {
    let read: OwnedFileDescriptor
    /// The test's copy of the write end: dropped once the child has its own, so EOF can come.
    var write: OwnedFileDescriptor?
    private var buffer: [UInt8] = []

    init() {
        var fds: [Int32] = [-1, -1]
        precondition(airlock_jail_pipe(&fds) == 0)
        read = OwnedFileDescriptor(adopting: fds[0])
        write = OwnedFileDescriptor(adopting: fds[1])
    }

    /// Reads lines until one starts with `prefix` (or EOF / timeout); returns all lines read.
    func lines(until prefix: String?, timeout: Double = 10) -> [String] {
        let deadline = monotonicNanoseconds() + UInt64(timeout * 1e9)
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let text = String(decoding: buffer, as: UTF8.self)
            let lines = text.split(separator: "\n").map(String.init)
            if let prefix, lines.contains(where: { $0.hasPrefix(prefix) }) { return lines }
            let now = monotonicNanoseconds()
            if now >= deadline { return lines }
            var p = pollfd(fd: read.rawValue, events: Int16(POLLIN), revents: 0)
            if poll(&p, 1, Int32((deadline - now) / 1_000_000) + 1) <= 0 { continue }
            let n = chunk.withUnsafeMutableBytes { Glibc.read(read.rawValue, $0.baseAddress, $0.count) }
            if n <= 0 { return lines }
            buffer += chunk[0..<n]
        }
    }

    /// Everything until EOF (the writer's copies must be closed).
    func all(timeout: Double = 10) -> String {
        _ = lines(until: nil, timeout: timeout)
        return String(decoding: buffer, as: UTF8.self)
    }
}

/// A probe running in a fresh jail.
final class ProbeRun {
    let jail: PreparedJail
    let child: JailedChild
    let stdout = PipeReader()
    let stderr = PipeReader()
    var stdinWrite: OwnedFileDescriptor?

    init(id: String, arguments: [String], request: JailRequest = TestJails.request(), passKVM: Bool = false) throws {
        jail = try TestJails.supervisor.prepare(id: id, request)
        var stdinFds: [Int32] = [-1, -1]
        precondition(airlock_jail_pipe(&stdinFds) == 0)
        let stdinRead = OwnedFileDescriptor(adopting: stdinFds[0])
        stdinWrite = OwnedFileDescriptor(adopting: stdinFds[1])
        var fds: [Int32: Int32] = [0: stdinRead.rawValue, 1: stdout.write!.rawValue, 2: stderr.write!.rawValue]
        if passKVM { fds[3] = TestJails.kvm.rawValue }
        child = try jail.spawn(executable: TestJails.probePath, arguments: arguments, fds: fds)
        // The child has its copies; the test keeps only its ends.
        withExtendedLifetime(stdinRead) {}
        stdout.write = nil
        stderr.write = nil
    }

    /// Lines up to "ready" (after both filters are in place).
    func ready() -> [String] {
        stdout.lines(until: "ready")
    }

    /// Closes stdin: a --hold probe then exits 0.
    func release() { stdinWrite = nil }

    func finish(timeout: Double = 10) throws -> JailExit {
        let exit = try child.wait(timeout: timeout)
        try #require(exit != nil, "the probe did not exit within \(timeout) s")
        try jail.destroy()
        return exit!
    }

    /// The VMM's host pid: the process in the VM's cgroup that is not stage 1.
    func vmmPid() throws -> pid_t {
        let procs = Cgroups.processes(in: jail.cgroupDirectories[0]).filter { $0 != child.pid }
        try #require(procs.count == 1, "expected one VMM process besides stage 1 in the cgroup, found \(procs)")
        return procs[0]
    }
}

/// "Key:\tvalue" fields of a /proc status file.
func statusFields(_ path: String) throws -> [String: String] {
    var fields: [String: String] = [:]
    for line in try FileIO.read(path).split(separator: "\n") {
        guard let colon = line.firstIndex(of: ":") else { continue }
        fields[String(line[..<colon])] = line[line.index(after: colon)...].trimmingCharacters(in: " \t")
    }
    return fields
}

extension Substring {
    func trimmingCharacters(in set: String) -> String {
        var s = self
        while let f = s.first, set.contains(f) { s.removeFirst() }
        while let l = s.last, set.contains(l) { s.removeLast() }
        return String(s)
    }
}

func readLink(_ path: String) -> String? {
    var buffer = [CChar](repeating: 0, count: 4096)
    let n = readlink(path, &buffer, buffer.count - 1)
    guard n >= 0 else { return nil }
    return String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
}
