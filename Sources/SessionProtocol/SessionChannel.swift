import AgentProtocol
import AirlockOS
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// One end of a session: frames (and the descriptors sent with them) over a `UnixSocket`.
///
/// Receiving is for one thread at a time; sending may come from any thread (whole frames
/// never interleave). Descriptors arrive with the first byte of the frame they belong to, so
/// once a frame is whole its descriptors are queued, in order, ahead of any later frame's.
public final class SessionChannel: @unchecked Sendable {
    // @unchecked: `decoder` and `queued` belong to the one receiving thread; sends hold `sendLock`.
    public let socket: UnixSocket
    private var decoder = FrameDecoder()
    private var queued: [OwnedFileDescriptor] = []
    private var closed = false
    private let sendLock = Mutex(())

    /// Bytes one receive takes at most.
    static let chunk = 64 << 10

    public init(socket: UnixSocket) { self.socket = socket }

    /// What a receive came to.
    public enum Received {
        case frame(type: UInt8, body: [UInt8])
        /// The peer closed its end (at a frame boundary or not).
        case closed
        case timedOut
    }

    /// Sends one whole frame with `descriptors` attached.
    public func send(_ frame: [UInt8], descriptors: [Int32] = []) throws(SystemError) {
        try sendLock.withLock { (_: inout ()) throws(SystemError) in try socket.send(frame, descriptors: descriptors) }
    }

    /// The next whole frame, waiting until `deadline` (monotonic ns; nil: forever).
    /// A malformed or oversized frame is an error, after which the channel stays failed.
    public func receive(until deadline: UInt64? = nil) throws(SessionChannelError) -> Received {
        while true {
            do {
                if let frame = try decoder.next() { return .frame(type: frame.type, body: frame.body) }
            } catch {
                throw .protocolError(error)
            }
            if closed { return .closed }
            var waitMs: Int?
            if let deadline {
                let now = monotonicNanoseconds()
                if now >= deadline { return .timedOut }
                waitMs = Int(min(UInt64(Int32.max), (deadline - now) / 1_000_000 + 1))
            }
            if !socket.waitUntilReadable(milliseconds: waitMs) { return .timedOut }
            let got: (bytes: [UInt8], descriptors: [OwnedFileDescriptor], truncated: Bool)
            do { got = try socket.receive(maxBytes: Self.chunk) } catch { throw .system(error) }
            if got.truncated { throw .tooManyDescriptors }
            queued += got.descriptors
            if got.bytes.isEmpty {
                closed = true
                if decoder.pendingBytes > 0 { throw .protocolError(.malformed("the stream ended inside a frame (\(decoder.pendingBytes) bytes of it)")) }
                return .closed
            }
            decoder.feed(got.bytes)
        }
    }

    /// The descriptors the frame just received came with: exactly `count`, in order, or nil
    /// (and all of them closed) when that many did not arrive.
    public func takeDescriptors(_ count: Int) -> [OwnedFileDescriptor]? {
        guard queued.count >= count else { queued = []; return nil }
        let taken = Array(queued.prefix(count))
        queued.removeFirst(count)
        return taken
    }

    /// How many descriptors are waiting that no frame has claimed.
    public var unclaimedDescriptors: Int { queued.count }

    /// Closes every descriptor no frame claimed (a peer that sent some it should not have).
    public func dropUnclaimedDescriptors() { queued = [] }
}

public enum SessionChannelError: Error, CustomStringConvertible, Sendable {
    case protocolError(ProtocolError)
    case system(SystemError)
    /// More descriptors came with one receive than any message carries.
    case tooManyDescriptors

    public var description: String {
        switch self {
        case let .protocolError(e): return "\(e)"
        case let .system(e): return "\(e)"
        case .tooManyDescriptors: return "more descriptors arrived than any session message carries"
        }
    }
}
