import AirlockOS
import Synchronization

/// Serial output straight to a host descriptor (the CLI's stdout).
public final class FileDescriptorSink: SerialSink {
    let fd: Int32
    public init(fd: Int32) { self.fd = fd }
    public func write(_ bytes: UnsafeRawBufferPointer) {
        // A closed or full stdout must not stop the guest; the bytes are dropped.
        try? AirlockOS.writeAll(fd: fd, bytes)
    }
}

/// Serial output kept in memory, up to `limit` bytes; what does not fit is counted, not kept.
public final class BufferSink: SerialSink {
    private let state: Mutex<(bytes: [UInt8], dropped: Int)>
    public let limit: Int

    public init(limit: Int = 1 << 20) {
        self.limit = limit
        state = Mutex(([], 0))
    }

    public func write(_ bytes: UnsafeRawBufferPointer) {
        state.withLock { s in
            let room = max(0, limit - s.bytes.count)
            s.bytes.append(contentsOf: bytes.prefix(room))
            s.dropped += max(0, bytes.count - room)
        }
    }

    public var bytes: [UInt8] { state.withLock { $0.bytes } }
    public var droppedBytes: Int { state.withLock { $0.dropped } }
    public var text: String { String(decoding: bytes, as: UTF8.self) }
}

/// Sends every byte to several sinks (the console and a capture, say).
public final class TeeSink: SerialSink {
    let sinks: [any SerialSink]
    public init(_ sinks: [any SerialSink]) { self.sinks = sinks }
    public func write(_ bytes: UnsafeRawBufferPointer) { for s in sinks { s.write(bytes) } }
}
