import CAirlockShim
#if canImport(Glibc)
import Glibc
#endif

/// One end of a Unix stream socketpair that carries byte frames and, attached to them,
/// file descriptors (SCM_RIGHTS). The supervisor and the VMM process talk over one.
///
/// Sending and receiving may happen on different threads at once (the kernel serialises
/// each direction); one thread sends at a time and one receives at a time.
public final class UnixSocket: Sendable {
    public let descriptor: OwnedFileDescriptor

    public init(adopting fd: Int32) { descriptor = OwnedFileDescriptor(adopting: fd) }

    /// A connected pair, both ends close-on-exec.
    public static func pair() throws(SystemError) -> (UnixSocket, UnixSocket) {
        var fds: [Int32] = [-1, -1]
        _ = try retryingSyscall("socketpair") { socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) }
        return (UnixSocket(adopting: fds[0]), UnixSocket(adopting: fds[1]))
    }

    /// Sends all of `bytes`, with `descriptors` attached to the first byte. Fails with EAGAIN
    /// when a send timeout (`setSendTimeout`) passes with the peer not reading, and EPIPE when
    /// the peer is gone (never SIGPIPE).
    public func send(_ bytes: [UInt8], descriptors: [Int32] = []) throws(SystemError) {
        guard descriptors.count <= Int(AIRLOCK_MAX_PASSED_FDS) else {
            throw SystemError("sendmsg", subject: "\(descriptors.count) descriptors", errno: EINVAL)
        }
        var done = 0
        var fds = descriptors
        while done < bytes.count || (done == 0 && bytes.isEmpty) {
            let n = bytes.withUnsafeBytes { raw in
                fds.withUnsafeMutableBufferPointer { f in
                    airlock_send_with_fds(descriptor.rawValue, raw.baseAddress! + done, raw.count - done, f.baseAddress, Int32(f.count))
                }
            }
            if n < 0 {
                if errno == EINTR { continue }
                throw SystemError("sendmsg", errno: errno)
            }
            // The descriptors went with the first bytes; the rest goes without.
            fds = []
            done += n
            if bytes.isEmpty { break }
        }
    }

    /// One receive of at most `maxBytes`: the bytes and the descriptors that came with them
    /// (owned now, close-on-exec). Zero bytes means the peer closed its end. `truncated`
    /// says descriptors arrived beyond what one receive takes (they were closed).
    public func receive(maxBytes: Int) throws(SystemError) -> (bytes: [UInt8], descriptors: [OwnedFileDescriptor], truncated: Bool) {
        var buffer = [UInt8](repeating: 0, count: maxBytes)
        var fds = [Int32](repeating: -1, count: Int(AIRLOCK_MAX_PASSED_FDS))
        var count: Int32 = 0, truncated: Int32 = 0
        while true {
            let n = buffer.withUnsafeMutableBytes { raw in
                fds.withUnsafeMutableBufferPointer { f in
                    airlock_receive_with_fds(descriptor.rawValue, raw.baseAddress, raw.count, f.baseAddress, &count, &truncated)
                }
            }
            if n < 0 {
                if errno == EINTR { continue }
                throw SystemError("recvmsg", errno: errno)
            }
            let owned = fds.prefix(Int(count)).map { OwnedFileDescriptor(adopting: $0) }
            return (Array(buffer.prefix(n)), owned, truncated != 0)
        }
    }

    /// Waits until a receive would not block (data, EOF or an error), up to `milliseconds`
    /// (nil: forever); false on timeout.
    public func waitUntilReadable(milliseconds: Int?) -> Bool {
        let deadline = milliseconds.map { monotonicNanoseconds() &+ UInt64(max(0, $0)) * 1_000_000 }
        while true {
            var remaining: Int32 = -1
            if let deadline {
                let now = monotonicNanoseconds()
                if now >= deadline { return false }
                remaining = Int32(min(UInt64(Int32.max), (deadline - now) / 1_000_000 + 1))
            }
            var p = pollfd(fd: descriptor.rawValue, events: Int16(POLLIN), revents: 0)
            let r = poll(&p, 1, remaining)
            if r > 0 { return true }
            if r == 0 { return false }
            if errno != EINTR { return true }  // let the receive report the error
        }
    }

    /// Bounds how long a send may wait for the peer to read (SO_SNDTIMEO).
    public func setSendTimeout(seconds: Int) throws(SystemError) {
        var tv = timeval(tv_sec: seconds, tv_usec: 0)
        _ = try retryingSyscall("setsockopt(SO_SNDTIMEO)") {
            setsockopt(descriptor.rawValue, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        }
    }

    /// Ends this side's sending (the peer reads EOF) without closing the descriptor.
    public func shutdownWrites() {
        _ = Glibc.shutdown(descriptor.rawValue, Int32(SHUT_WR))
    }
}
