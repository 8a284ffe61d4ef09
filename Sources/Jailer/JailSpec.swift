/// Per-process limits set with setrlimit(2) by Jail.enter.
public struct JailRlimits: Sendable, Equatable {
    /// RLIMIT_NOFILE: the VMM's fds (kvm, VM, vCPUs, images, console pipes).
    public var openFiles: UInt64
    /// RLIMIT_FSIZE: no write may reach past this offset in a regular file.
    /// It must cover the largest writable disk image the supervisor passes.
    /// `UInt64.max` is no limit (`PreparedJail.spawn` lifts it when a
    /// descriptor it passes at the start is a regular file, such as stderr
    /// redirected to a log).
    public var fileSize: UInt64
    /// RLIMIT_NPROC, counted per real uid across the host: set it only when
    /// the jail's uid is this VM's alone; nil leaves it as inherited.
    public var processes: UInt64?

    public init(openFiles: UInt64 = 256, fileSize: UInt64 = 0, processes: UInt64? = nil) {
        self.openFiles = openFiles
        self.fileSize = fileSize
        self.processes = processes
    }
}

/// Everything the jailed child needs to build its jail: made by the
/// supervisor (`JailSupervisor.prepare`), carried to the child as text
/// (`encoded()`) on a pipe that `PreparedJail.spawn` fills and the child
/// closes once it has read it (so nothing of it stays visible, in
/// /proc/<pid>/environ or anywhere else), consumed by `Jail.enter`.
///
/// The jail holds no files and no device nodes: everything the VMM uses
/// (/dev/kvm, the images) is opened by the supervisor and handed over as
/// descriptors, so the VMM cannot name a host path and never uses a device
/// node the caller could not open itself.
public struct JailSpec: Sendable, Equatable {
    /// The environment variable that names the descriptor the spec is on (a number only).
    public static let descriptorVariable = "AIRLOCK_JAIL_SPEC_FD"

    public var id: String
    /// The empty directory the jail's root filesystem is mounted on.
    public var rootDirectory: String
    /// The unprivileged identity the VMM runs as (never 0).
    public var uid: UInt32
    public var gid: UInt32
    /// Descriptors that stay open (at the same numbers); every other one is closed.
    public var keepFds: [Int32]
    /// cgroup directories (one per v1 hierarchy, or one v2 group) to join.
    public var cgroups: [String]
    public var rlimits: JailRlimits
    /// Also unshare a user namespace (uid and gid 0 inside are the jail's
    /// uid and gid outside).
    public var userNamespace: Bool
    /// Read end of a pipe whose write end only the supervisor holds: when it
    /// reads EOF the supervisor is gone and stage 1 ends the VMM. Not kept in stage 2.
    public var lifelineFd: Int32?
    public var hostname: String

    public init(id: String, rootDirectory: String, uid: UInt32, gid: UInt32, keepFds: [Int32] = [0, 1, 2],
                cgroups: [String] = [], rlimits: JailRlimits = JailRlimits(), userNamespace: Bool = false,
                lifelineFd: Int32? = nil, hostname: String = "airlock") {
        self.id = id
        self.rootDirectory = rootDirectory
        self.uid = uid
        self.gid = gid
        self.keepFds = keepFds
        self.cgroups = cgroups
        self.rlimits = rlimits
        self.userNamespace = userNamespace
        self.lifelineFd = lifelineFd
        self.hostname = hostname
    }

    /// Checks what Jail.enter relies on, so a bad spec fails before any step runs.
    public func validate() throws(JailError) {
        try JailID.validate(id)
        guard rootDirectory.hasPrefix("/") else {
            throw .invalid("jail root '\(rootDirectory)' is not an absolute path: pass the directory JailSupervisor.prepare made")
        }
        guard uid != 0, gid != 0 else {
            throw .invalid("jail uid \(uid) / gid \(gid): the VMM must not run as root; pick an unused uid and gid above 0")
        }
        for fd in keepFds where fd < 0 {
            throw .invalid("kept fd \(fd) is negative: list the descriptor numbers the VMM uses")
        }
        guard !hostname.isEmpty, hostname.utf8.count <= 64 else {
            throw .invalid("hostname '\(hostname)' must be 1 to 64 bytes")
        }
        if let lifelineFd, lifelineFd < 0 {
            throw .invalid("lifeline fd \(lifelineFd) is negative: give the descriptor's number")
        }
        if let lifelineFd, keepFds.contains(lifelineFd) {
            throw .invalid("lifeline fd \(lifelineFd) is also a kept fd: the lifeline must not reach the VMM")
        }
    }

    // MARK: Text form

    private static let magic = "airlock-jail-spec 1"

    /// One "key value" line per field; values are percent-encoded, so paths
    /// with spaces or newlines survive.
    public func encoded() -> String {
        var lines = [Self.magic]
        func add(_ key: String, _ values: String...) {
            lines.append(([key] + values.map(Self.escape)).joined(separator: " "))
        }
        add("id", id)
        add("root", rootDirectory)
        add("uid", String(uid))
        add("gid", String(gid))
        for fd in keepFds { add("keep-fd", String(fd)) }
        for c in cgroups { add("cgroup", c) }
        add("nofile", String(rlimits.openFiles))
        add("fsize", String(rlimits.fileSize))
        if let p = rlimits.processes { add("nproc", String(p)) }
        if userNamespace { add("userns", "1") }
        if let lifelineFd { add("lifeline-fd", String(lifelineFd)) }
        add("hostname", hostname)
        return lines.joined(separator: "\n")
    }

    /// Parses `encoded()`; any unknown key or malformed value is an error
    /// (the supervisor and the child are the same binary, so a mismatch is a bug).
    public init(decoding text: String) throws(JailError) {
        var lines = text.split(separator: "\n", omittingEmptySubsequences: true).map(String.init)
        guard lines.first == Self.magic else {
            throw .invalid("not a jail spec (first line '\(lines.first ?? "")', expected '\(Self.magic)'): pass JailSpec.encoded()")
        }
        lines.removeFirst()
        var spec = JailSpec(id: "", rootDirectory: "", uid: 0, gid: 0, keepFds: [])
        func number<T: FixedWidthInteger>(_ s: String, _ key: String) throws(JailError) -> T {
            guard let v = T(s) else { throw .invalid("jail spec: '\(key)' has a bad number '\(s)'") }
            return v
        }
        for line in lines {
            let fields = line.split(separator: " ", omittingEmptySubsequences: false).map(String.init)
            let key = fields[0]
            var values: [String] = []
            for f in fields.dropFirst() { values.append(try Self.unescape(f)) }
            func expect(_ n: Int) throws(JailError) {
                if values.count != n { throw .invalid("jail spec: '\(key)' takes \(n) value(s), got \(values.count)") }
            }
            switch key {
            case "id": try expect(1); spec.id = values[0]
            case "root": try expect(1); spec.rootDirectory = values[0]
            case "uid": try expect(1); spec.uid = try number(values[0], key)
            case "gid": try expect(1); spec.gid = try number(values[0], key)
            case "keep-fd": try expect(1); spec.keepFds.append(try number(values[0], key))
            case "cgroup": try expect(1); spec.cgroups.append(values[0])
            case "nofile": try expect(1); spec.rlimits.openFiles = try number(values[0], key)
            case "fsize": try expect(1); spec.rlimits.fileSize = try number(values[0], key)
            case "nproc": try expect(1); spec.rlimits.processes = try number(values[0], key)
            case "userns": try expect(1); spec.userNamespace = values[0] == "1"
            case "lifeline-fd": try expect(1); spec.lifelineFd = try number(values[0], key)
            case "hostname": try expect(1); spec.hostname = values[0]
            default: throw .invalid("jail spec: unknown key '\(key)': the supervisor and the VMM must be the same airlock build")
            }
        }
        try spec.validate()
        self = spec
    }

    static func escape(_ s: String) -> String {
        if s.isEmpty { return "%" }  // a lone '%' stands for the empty string
        var out = ""
        for byte in s.utf8 {
            let c = Character(Unicode.Scalar(byte))
            if byte > 0x20, byte < 0x7F, byte != UInt8(ascii: "%") {
                out.append(c)
            } else {
                out += "%" + (byte < 16 ? "0" : "") + String(byte, radix: 16, uppercase: true)
            }
        }
        return out
    }

    static func unescape(_ s: String) throws(JailError) -> String {
        if s == "%" { return "" }
        var bytes: [UInt8] = []
        var it = Array(s.utf8)[...]
        while let b = it.popFirst() {
            if b == UInt8(ascii: "%") {
                guard it.count >= 2, let v = UInt8(String(decoding: it.prefix(2), as: UTF8.self), radix: 16) else {
                    throw .invalid("jail spec: bad escape in '\(s)'")
                }
                bytes.append(v)
                it = it.dropFirst(2)
            } else {
                bytes.append(b)
            }
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}

/// VM ids become directory and cgroup names.
enum JailID {
    static func validate(_ id: String) throws(JailError) {
        let ok = !id.isEmpty && id.utf8.count <= 64 && !id.hasPrefix(".") && id.utf8.allSatisfy {
            ($0 >= UInt8(ascii: "a") && $0 <= UInt8(ascii: "z")) || ($0 >= UInt8(ascii: "A") && $0 <= UInt8(ascii: "Z"))
                || ($0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9")) || $0 == UInt8(ascii: "-") || $0 == UInt8(ascii: "_")
                || $0 == UInt8(ascii: ".")
        }
        if !ok {
            throw .invalid("VM id '\(id)' is not usable as a directory and cgroup name: use 1 to 64 of A-Z a-z 0-9 . _ - (not starting with '.')")
        }
    }
}
