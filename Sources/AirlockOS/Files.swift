#if canImport(Glibc)
import Glibc
#endif

/// What went wrong reading a user-supplied file, phrased so the user can fix it.
public struct FileAccessError: Error, CustomStringConvertible, Sendable {
    public let path: String
    public let role: String
    public let underlying: SystemError

    public init(path: String, role: String, underlying: SystemError) {
        self.path = path
        self.role = role
        self.underlying = underlying
    }

    public var description: String {
        switch underlying.errno {
        case ENOENT: return "\(role) '\(path)' does not exist: check the path, or build the default images with 'make images'"
        case EACCES, EPERM: return "\(role) '\(path)' is not readable by this user: fix its permissions or run as a user who can read it"
        case EISDIR: return "\(role) '\(path)' is a directory: pass the file itself"
        case ENODEV: return "\(role) '\(path)' is not a regular file (a pipe or device): pass an image file"
        default: return "cannot read \(role) '\(path)': \(underlying)"
        }
    }
}

/// A regular file opened and mapped read-only, for images read in place
/// (a kernel is 10+ MiB: reading it into an array cost more page faults than
/// the rest of VM creation). The descriptor stays open so parts of the file can
/// be mapped again elsewhere (guest RAM, copy-on-write).
public final class MappedFile: @unchecked Sendable {
    // @unchecked: immutable after init; the mapping is read-only.
    public let path: String
    public let descriptor: OwnedFileDescriptor
    private let mapping: MemoryMapping?  // nil for an empty file: mmap refuses length 0
    public let size: Int

    public convenience init(path: String, role: String) throws(FileAccessError) {
        let fd: OwnedFileDescriptor
        do { fd = try OwnedFileDescriptor.open(path, flags: O_RDONLY) } catch {
            throw FileAccessError(path: path, role: role, underlying: error)
        }
        try self.init(descriptor: fd, path: path, role: role)
    }

    /// Maps a file the caller opened (a supervisor opens images for a jailed VMM, which has
    /// no path to them); `path` names it in messages.
    public init(descriptor fd: OwnedFileDescriptor, path: String, role: String) throws(FileAccessError) {
        do throws(SystemError) {
            var info = stat()
            _ = try retryingSyscall("fstat", subject: path) { fstat(fd.rawValue, &info) }
            switch info.st_mode & S_IFMT {
            case S_IFDIR: throw SystemError("open", subject: path, errno: EISDIR)
            case S_IFREG: break
            // A pipe or device has no stable bytes to map.
            default: throw SystemError("mmap", subject: path, errno: ENODEV)
            }
            self.path = path
            self.descriptor = fd
            self.size = Int(info.st_size)
            self.mapping = size == 0 ? nil : try MemoryMapping.readOnlyFile(fd: fd.rawValue, length: size, what: "\(role) \(path)")
        } catch {
            throw FileAccessError(path: path, role: role, underlying: error)
        }
    }

    /// The file's bytes; valid while this object lives.
    public var bytes: UnsafeRawBufferPointer {
        guard let mapping else { return UnsafeRawBufferPointer(start: nil, count: 0) }
        // Sound: the mapping is `size` bytes long, read-only, and owned by self.
        return UnsafeRawBufferPointer(start: mapping.base, count: size)
    }
}

/// Monotonic clock in nanoseconds, for timings.
public func monotonicNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}
