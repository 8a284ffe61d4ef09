#if canImport(Glibc)
import Glibc
#endif

/// Why a workspace image could not be built, or artifacts could not be
/// brought back. Every message names the directory, image or entry involved
/// and says what to do.
public enum WorkspaceError: Error, CustomStringConvertible, Equatable, Sendable {
    /// Bad input from the caller (a path, a size, a limit).
    case invalid(String)
    /// A host system call failed.
    case system(String, errno: Int32)
    /// mke2fs (or another e2fsprogs tool) failed; `output` is what it printed.
    case tool(String, output: String)
    /// What the guest left is refused: `entry` is its path under the artifacts directory.
    case refused(entry: String, reason: String)
    /// The workspace image the guest wrote cannot be read (corrupt, replaced, crafted).
    case unreadableImage(String)
    /// Writing into the output directory failed on the host.
    case output(String)

    public var description: String {
        switch self {
        case let .invalid(m), let .output(m): return m
        case let .system(call, e): return "\(call) failed: \(String(cString: strerror(e)))"
        case let .tool(what, output):
            let tail = output.split(separator: "\n").suffix(5).joined(separator: "\n")
            return tail.isEmpty ? what : "\(what):\n\(tail)"
        case let .refused(entry, reason):
            return "artifact '\(entry)' refused: \(reason); nothing was kept in the output directory"
        case let .unreadableImage(m):
            return "the artifacts cannot be read from the workspace image the guest wrote: \(m); nothing was kept in the output directory"
        }
    }
}
