/// A file system the agent mounts before it says hello: a disk the host
/// attached (the workspace, `--disk` images) or a tmpfs to hold mount points.
///
/// The host names them on the kernel command line, which the kernel hands to
/// init's environment: `AIRLOCK_MOUNTS=tmpfs:/mnt:rw,vdb:/workspace:rw:own,vdc:/mnt/disk0:ro`,
/// in the order they are mounted (`:own`: `ownedByRunUser`). Disks are attached when the machine is built,
/// so a session's mounts are known before the agent starts; no message is needed.
/// Both sides parse with `decode`, so a target the host accepted is one the agent
/// can mount, and a guest path can never carry a separator or a parameter.
public struct GuestMount: Equatable, Sendable {
    public enum Source: Equatable, Sendable {
        /// A virtio-blk disk by its device name ("vdb"), mounted as ext4.
        case disk(String)
        /// An empty tmpfs (mode 755), for mount points under a read-only root.
        case tmpfs
    }

    public var source: Source
    /// Absolute, normalised guest path: created when missing (which needs a writable parent).
    public var target: String
    public var readOnly: Bool
    /// The tree is given to each run's user (a read-write workspace made from
    /// host files, which carry the host's owners, for a command run as `--user`).
    public var ownedByRunUser: Bool

    public init(source: Source, target: String, readOnly: Bool, ownedByRunUser: Bool = false) {
        self.source = source
        self.target = target
        self.readOnly = readOnly
        self.ownedByRunUser = ownedByRunUser
    }

    /// The environment variable (a kernel command-line parameter) that carries the list.
    public static let variable = "AIRLOCK_MOUNTS"
    /// Mounts one machine may ask for: its disks plus a tmpfs, well within the command line.
    public static let maxCount = 16
    /// Longest target path accepted.
    public static let maxTargetBytes = 255

    /// The disk name the n-th virtio-blk device gets in the guest: vda, vdb, ..., vdz, vdaa, ...
    public static func diskName(index: Int) -> String {
        let letters = Array("abcdefghijklmnopqrstuvwxyz")
        var name = ""
        var n = index
        repeat {
            name = String(letters[n % 26]) + name
            n = n / 26 - 1
        } while n >= 0
        return "vd" + name
    }

    /// Why `path` cannot be a mount target, or nil. Only what a kernel command
    /// line carries unquoted and unambiguously: letters, digits and `._+@-`
    /// between slashes, no `.` or `..` components, no empty ones.
    public static func targetProblem(_ path: String) -> String? {
        let bytes = Array(path.utf8)
        guard bytes.first == UInt8(ascii: "/") else { return "it must be an absolute path (starting with '/')" }
        guard bytes.count <= maxTargetBytes else { return "it is longer than \(maxTargetBytes) bytes" }
        guard path != "/" else { return "'/' is the root filesystem itself" }
        for component in path.split(separator: "/", omittingEmptySubsequences: false).dropFirst() {
            if component.isEmpty { return "it has an empty component ('//' or a trailing '/')" }
            if component == "." || component == ".." { return "it has a '.' or '..' component" }
            for c in component.utf8 {
                let ok = (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5A) || (c >= 0x61 && c <= 0x7A)
                    || c == UInt8(ascii: ".") || c == UInt8(ascii: "_") || c == UInt8(ascii: "+") || c == UInt8(ascii: "@")
                    || c == UInt8(ascii: "-")
                if !ok { return "it may hold only letters, digits and . _ + @ - between slashes" }
            }
        }
        return nil
    }

    /// Whether `path` is `ancestor` or lies under it.
    public static func path(_ path: String, isUnder ancestor: String) -> Bool {
        path == ancestor || path.hasPrefix(ancestor + "/")
    }

    public static func encode(_ mounts: [GuestMount]) -> String {
        mounts.map { m in
            let source: String
            switch m.source {
            case let .disk(name): source = name
            case .tmpfs: source = "tmpfs"
            }
            return "\(source):\(m.target):\(m.readOnly ? "ro" : "rw")" + (m.ownedByRunUser ? ":own" : "")
        }.joined(separator: ",")
    }

    public static func decode(_ text: String) throws(ProtocolError) -> [GuestMount] {
        if text.isEmpty { return [] }
        let entries = text.split(separator: ",", omittingEmptySubsequences: false)
        guard entries.count <= maxCount else { throw .malformed("\(entries.count) mounts, more than \(maxCount)") }
        var mounts: [GuestMount] = []
        for entry in entries {
            let parts = entry.split(separator: ":", omittingEmptySubsequences: false).map(String.init)
            guard parts.count == 3 || (parts.count == 4 && parts[3] == "own" && parts[2] == "rw") else {
                throw .malformed("mount '\(entry)' is not SOURCE:TARGET:ro|rw or SOURCE:TARGET:rw:own")
            }
            let source: Source
            if parts[0] == "tmpfs" {
                source = .tmpfs
            } else if parts[0].hasPrefix("vd"), parts[0].count >= 3, parts[0].count <= 4,
                      parts[0].utf8.dropFirst(2).allSatisfy({ $0 >= 0x61 && $0 <= 0x7A }) {
                source = .disk(parts[0])
            } else {
                throw .malformed("mount source '\(parts[0])' is neither a disk (vdX) nor tmpfs")
            }
            if let problem = targetProblem(parts[1]) { throw .malformed("mount target '\(parts[1])': \(problem)") }
            guard parts[2] == "ro" || parts[2] == "rw" else { throw .malformed("mount mode '\(parts[2])' is neither ro nor rw") }
            mounts.append(GuestMount(source: source, target: parts[1], readOnly: parts[2] == "ro", ownedByRunUser: parts.count == 4))
        }
        return mounts
    }
}
