#if canImport(Glibc)
import Glibc
#endif

/// Owns one file descriptor and closes it exactly once, when the owner goes away.
///
/// Every fd Airlock opens (/dev/kvm, the VM, each vCPU, images) lives in one of
/// these, so no code path can leak or double-close one.
public final class OwnedFileDescriptor: Sendable {
    public let rawValue: Int32

    public init(adopting rawValue: Int32) {
        precondition(rawValue >= 0, "adopting an invalid file descriptor")
        self.rawValue = rawValue
    }

    /// Opens `path` with O_CLOEXEC added, retrying on EINTR.
    public static func open(_ path: String, flags: Int32, mode: mode_t = 0) throws(SystemError) -> OwnedFileDescriptor {
        let fd = try retryingSyscall("open", subject: path) { Glibc.open(path, flags | O_CLOEXEC, mode) }
        return OwnedFileDescriptor(adopting: fd)
    }

    deinit { _ = Glibc.close(rawValue) }

    /// Size of the file behind the descriptor.
    public func size(path: String? = nil) throws(SystemError) -> Int {
        var info = stat()
        _ = try retryingSyscall("fstat", subject: path) { fstat(rawValue, &info) }
        return Int(info.st_size)
    }

    /// Reads up to `buffer.count` bytes at `offset`; returns how many were read.
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: Int, path: String? = nil) throws(SystemError) -> Int {
        guard let base = buffer.baseAddress, buffer.count > 0 else { return 0 }
        return try retryingSyscall("read", subject: path) { pread(rawValue, base, buffer.count, off_t(offset)) }
    }

    /// Reads exactly `buffer.count` bytes at `offset`, or reports how many were available.
    public func readExactly(into buffer: UnsafeMutableRawBufferPointer, at offset: Int, path: String? = nil) throws(SystemError) -> Int {
        var done = 0
        while done < buffer.count {
            let n = try read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[done...]), at: offset + done, path: path)
            if n == 0 { break }
            done += n
        }
        return done
    }

    /// Writes all of `bytes`, retrying short writes and EINTR.
    public func writeAll(_ bytes: UnsafeRawBufferPointer) throws(SystemError) {
        var done = 0
        while done < bytes.count {
            let n = try retryingSyscall("write") { Glibc.write(rawValue, bytes.baseAddress! + done, bytes.count - done) }
            done += n
        }
    }
}

/// Writes all of `bytes` to a descriptor this code does not own (stdout, stderr).
public func writeAll(fd: Int32, _ bytes: UnsafeRawBufferPointer) throws(SystemError) {
    var done = 0
    while done < bytes.count {
        let n = try retryingSyscall("write") { Glibc.write(fd, bytes.baseAddress! + done, bytes.count - done) }
        done += n
    }
}

/// Writes `text` to standard error, best effort: a closed stderr must not stop the caller.
public func writeToStandardError(_ text: String) {
    var text = text
    text.withUTF8 { try? writeAll(fd: 2, UnsafeRawBufferPointer($0)) }
}
