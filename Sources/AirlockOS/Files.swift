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
        default: return "cannot read \(role) '\(path)': \(underlying)"
        }
    }
}

/// Reads a whole regular file into memory.
public func readWholeFile(_ path: String, role: String, limit: Int = Int.max) throws(FileAccessError) -> [UInt8] {
    do throws(SystemError) {
        let fd = try OwnedFileDescriptor.open(path, flags: O_RDONLY)
        var info = stat()
        _ = try retryingSyscall("fstat", subject: path) { fstat(fd.rawValue, &info) }
        if (info.st_mode & S_IFMT) == S_IFDIR { throw SystemError("open", subject: path, errno: EISDIR) }
        let size = Int(info.st_size)
        if size > limit { throw SystemError("read", subject: path, errno: EFBIG) }
        var bytes = [UInt8](repeating: 0, count: size)
        var result: Result<Int, SystemError> = .success(0)
        bytes.withUnsafeMutableBytes { buf in
            result = Result { () throws(SystemError) -> Int in try fd.readExactly(into: buf, at: 0, path: path) }
        }
        let n = try result.get()
        if n < size { bytes.removeLast(size - n) }
        return bytes
    } catch {
        throw FileAccessError(path: path, role: role, underlying: error)
    }
}

/// Monotonic clock in nanoseconds, for timings.
public func monotonicNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}
