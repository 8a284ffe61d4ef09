/// What goes wrong with bytes that claim to be protocol frames (the agent protocol, and the
/// session protocol that reuses its framing).
public enum ProtocolError: Error, Equatable, CustomStringConvertible {
    /// A frame or body that does not follow the format; the channel cannot be trusted after it.
    case malformed(String)
    /// The other side speaks another protocol version.
    case versionMismatch(theirs: UInt16, ours: UInt16)

    public var description: String {
        switch self {
        case let .malformed(why): return "malformed protocol frame: \(why)"
        case let .versionMismatch(theirs, ours):
            return "the guest agent speaks protocol version \(theirs), this Airlock speaks \(ours): rebuild the root filesystem with this Airlock's agent (make images; make rootfs-build for the toolchain image)"
        }
    }
}

/// Framing on a byte stream (a virtio-console port): each frame is
///
///     length: u32 LE (type byte + body) | type: u8 | body
///
/// The length is checked against `Frame.maxLength` before anything is
/// buffered, so a peer cannot make the reader hold more than one frame's worth.
public enum Frame {
    /// The largest frame either side accepts: a run request with its argv and
    /// environment, or one stdin chunk, fits with room to spare.
    public static let maxLength = 1 << 20
    public static let headerSize = 5

    public static func encode(type: UInt8, body: [UInt8]) -> [UInt8] {
        precondition(body.count + 1 <= maxLength, "frame of \(body.count) bytes is over the protocol's limit")
        var w = WireWriter()
        w.u32(UInt32(body.count + 1))
        w.u8(type)
        return w.bytes + body
    }
}

/// Splits a byte stream into frames. Feed it whatever arrived; take whole frames out.
/// After the first error it stays failed: framing cannot resynchronise on a
/// stream that lied about a length.
public struct FrameDecoder {
    private var buffer: [UInt8] = []
    private var start = 0
    public private(set) var failure: ProtocolError?

    public init() {}

    /// Bytes received but not yet part of a whole frame.
    public var pendingBytes: Int { buffer.count - start }

    public mutating func feed(_ bytes: some Sequence<UInt8>) {
        guard failure == nil else { return }
        buffer.append(contentsOf: bytes)
    }

    /// The next whole frame, nil when more bytes are needed.
    public mutating func next() throws(ProtocolError) -> (type: UInt8, body: [UInt8])? {
        if let failure { throw failure }
        guard pendingBytes >= Frame.headerSize else { compact(); return nil }
        let length = Int(buffer[start]) | Int(buffer[start + 1]) << 8 | Int(buffer[start + 2]) << 16 | Int(buffer[start + 3]) << 24
        guard length >= 1, length <= Frame.maxLength else {
            let e = ProtocolError.malformed("frame length \(length) is outside 1...\(Frame.maxLength)")
            failure = e
            buffer = []
            start = 0
            throw e
        }
        guard pendingBytes >= 4 + length else { compact(); return nil }
        let type = buffer[start + 4]
        let body = Array(buffer[(start + 5)..<(start + 4 + length)])
        start += 4 + length
        return (type, body)
    }

    /// Drops consumed bytes once they are the larger part, so the buffer stays at most about two frames.
    private mutating func compact() {
        if start > 0 && start >= buffer.count / 2 {
            buffer.removeFirst(start)
            start = 0
        }
    }
}
