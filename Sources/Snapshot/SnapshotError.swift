import AirlockOS

/// Why a snapshot cannot be written or used. Every case names the file; the
/// message says what to do. A snapshot is a cache of a boot: the fix for a
/// bad one is always to remove it and make a new one.
public enum SnapshotError: Error, CustomStringConvertible, Sendable, Equatable {
    /// Shorter than its header or sections say: an interrupted write, a full disk.
    case truncated(path: String, detail: String)
    /// Does not start with Airlock's snapshot magic.
    case notASnapshot(path: String)
    /// Written in another format version.
    case versionMismatch(path: String, found: UInt32, supported: UInt32)
    /// A part's bytes do not match its SHA-256, or a record does not decode.
    case corrupted(path: String, part: String, detail: String)
    /// Made from other inputs or on another kind of host: other kernel, root
    /// filesystem, command line, memory size, CPU features, KVM backend or guest mode.
    case foreign(path: String, detail: String)
    /// The file could not be read or written.
    case io(path: String, SystemError)
    /// The machine cannot be saved (not paused, unknown device).
    case cannotSave(String)

    static let remedy = "remove it ('airlock snapshot rm', or delete the file) and make a new one ('airlock snapshot create', or the next 'airlock run' does)"

    public var description: String {
        switch self {
        case let .truncated(path, detail):
            return "snapshot \(path) is truncated (\(detail)): it was not written to the end; \(Self.remedy)"
        case let .notASnapshot(path):
            return "\(path) is not an Airlock snapshot (no snapshot header): pass a file made by 'airlock snapshot create'"
        case let .versionMismatch(path, found, supported):
            return "snapshot \(path) has format version \(found), this Airlock reads version \(supported): it was made by another Airlock; \(Self.remedy)"
        case let .corrupted(path, part, detail):
            return "snapshot \(path) is corrupted: its \(part) \(detail); \(Self.remedy)"
        case let .foreign(path, detail):
            return "snapshot \(path) was not made for this machine: \(detail); use a snapshot made here with these images, or \(Self.remedy)"
        case let .io(path, error):
            return "snapshot \(path): \(error)"
        case let .cannotSave(why):
            return "the VM cannot be saved: \(why)"
        }
    }
}
