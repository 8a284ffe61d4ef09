import AirlockOS
import Dispatch
import Synchronization
import VirtioDevices
#if canImport(Glibc)
import Glibc
#endif

/// One output port's host side (the command's stdout or stderr).
///
/// Guest bytes arrive on a vCPU thread (`write`, with the console device's
/// lock held), wait in a bounded buffer, and a writer thread delivers them to
/// the run's destination, which may block (a pipe the caller reads slowly).
/// While the buffer is over its high mark, `acceptsMore` is false and the
/// guest's buffers stay in the virtqueue, so the guest blocks instead of the
/// host growing; the writer calls `resume` once it has caught up.
final class OutputPump: ConsoleOutput, @unchecked Sendable {
    // @unchecked: every mutable field is in `state`; `resume` is set once before the VM runs.
    static let highWater = 256 << 10

    struct Sink {
        let destination: OutputDestination
        let limit: Int?
        var kept = 0
        var truncated = false
        var captured: [UInt8] = []
    }

    struct State {
        var buffer: [UInt8] = []
        /// Every byte the guest sent on this port since boot (kept or not): the agent reports the same count.
        var received: UInt64 = 0
        var sink: Sink?
        var throttled = false
        var delivering = false
        var closed = false
    }

    private let state = Mutex(State())
    private let wake = DispatchSemaphore(value: 0)
    /// Re-services the port's transmit queue after a throttle (set by the session).
    var resume: (@Sendable () -> Void)?
    /// Called after bytes were received or delivered, so a waiter can re-check.
    var progress: (@Sendable () -> Void)?
    let name: String

    init(name: String) {
        self.name = name
    }

    func start() throws(SystemError) {
        try startDetachedThread { [self] in writerLoop() }
    }

    /// Routes output to a new run's destination; bytes that come before any run are counted and dropped.
    func begin(_ destination: OutputDestination, limit: Int?) {
        var effective = limit
        if case .capture = destination { effective = Command.capturedBytesLimit(limit) }
        state.withLock { $0.sink = Sink(destination: destination, limit: effective) }
    }

    /// Ends the run's routing; returns what was captured and whether anything was cut.
    func finish() -> (captured: [UInt8], truncated: Bool) {
        state.withLock { s in
            let result = (s.sink?.captured ?? [], s.sink?.truncated ?? false)
            s.sink = nil
            return result
        }
    }

    var received: UInt64 { state.withLock { $0.received } }

    /// Whether everything received so far has been handed to its destination.
    var idle: Bool { state.withLock { $0.buffer.isEmpty && !$0.delivering } }

    func close() {
        state.withLock { $0.closed = true }
        wake.signal()
    }

    var acceptsMore: Bool {
        state.withLock { s in
            if s.buffer.count < Self.highWater { return true }
            s.throttled = true
            return false
        }
    }

    func write(_ bytes: UnsafeRawBufferPointer) {
        state.withLock { s in
            s.received += UInt64(bytes.count)
            guard var sink = s.sink else { return }
            var take = bytes.count
            if let limit = sink.limit {
                take = min(take, max(0, limit - sink.kept))
                if take < bytes.count { sink.truncated = true }
            }
            sink.kept += take
            if take > 0 {
                if case .capture = sink.destination {
                    sink.captured.append(contentsOf: bytes.prefix(take))
                } else {
                    s.buffer.append(contentsOf: bytes.prefix(take))
                }
            }
            s.sink = sink
        }
        wake.signal()
        progress?()
    }

    private func writerLoop() {
        while true {
            wake.wait()
            while true {
                let (chunk, destination, closed) = state.withLock { s -> ([UInt8], OutputDestination?, Bool) in
                    let c = s.buffer
                    s.buffer.removeAll(keepingCapacity: true)
                    s.delivering = !c.isEmpty
                    return (c, s.sink?.destination, s.closed)
                }
                if chunk.isEmpty {
                    if closed { return }
                    break
                }
                switch destination {
                case let .fileDescriptor(fd)?:
                    // A reader that went away (EPIPE) must not stop the run: its bytes are dropped.
                    chunk.withUnsafeBytes { try? AirlockOS.writeAll(fd: fd, $0) }
                case let .handler(h)?:
                    h(chunk)
                case .capture?, nil:
                    break
                }
                let wasThrottled = state.withLock { s -> Bool in
                    s.delivering = false
                    let t = s.throttled
                    s.throttled = false
                    return t
                }
                if wasThrottled { resume?() }
                progress?()
            }
        }
    }
}
