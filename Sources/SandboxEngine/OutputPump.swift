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
/// the run's descriptor, which may block (a pipe the supervisor reads slowly,
/// a terminal). While the buffer is over its high mark, `acceptsMore` is false
/// and the guest's buffers stay in the virtqueue, so the guest blocks instead
/// of the host growing; the writer calls `resume` once it has caught up.
final class OutputPump: ConsoleOutput, @unchecked Sendable {
    // @unchecked: every mutable field is in `state`; `resume` and `progress` are set once before the VM runs.
    static let highWater = 256 << 10

    /// Where one run's output goes, and what happened to it.
    struct Sink {
        let descriptor: OwnedFileDescriptor
        /// Bytes past this are dropped and counted; nil: no limit.
        let limit: UInt64?
        var kept: UInt64 = 0
        var dropped: UInt64 = 0
        var delivered: UInt64 = 0
        var lastByte: UInt8?
    }

    struct State {
        var buffer: [UInt8] = []
        /// Every byte the guest sent on this port since boot (kept or not): the agent reports the same count.
        var received: UInt64 = 0
        var sink: Sink?
        var throttled = false
        var delivering = false
        /// Bytes the writer took and is writing now: still behind the consumer.
        var inFlight = 0
        var closed = false
    }

    /// What a run's stream came to.
    struct Totals: Equatable {
        var delivered: UInt64 = 0, dropped: UInt64 = 0
        var endsMidLine = false
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

    /// Routes output to a new run's descriptor; bytes that come before any run are counted and dropped.
    func begin(_ descriptor: OwnedFileDescriptor, limit: UInt64?) {
        state.withLock { $0.sink = Sink(descriptor: descriptor, limit: limit) }
    }

    /// Ends the run's routing and lets go of its descriptor (the reader sees EOF once every
    /// copy is closed); call it once `idle` says everything was written.
    func finish() -> Totals {
        state.withLock { s in
            guard let sink = s.sink else { return Totals() }
            s.sink = nil
            return Totals(delivered: sink.delivered, dropped: sink.dropped,
                          endsMidLine: sink.lastByte.map { $0 != UInt8(ascii: "\n") } ?? false)
        }
    }

    var received: UInt64 { state.withLock { $0.received } }

    /// Whether everything received so far has been handed to its destination.
    var idle: Bool { state.withLock { $0.buffer.isEmpty && !$0.delivering } }

    func close() {
        state.withLock { s in
            s.closed = true
            s.sink = nil
        }
        wake.signal()
    }

    var acceptsMore: Bool {
        state.withLock { s in
            // What the writer is blocked on counts too: the consumer has not taken it yet.
            if s.buffer.count + s.inFlight < Self.highWater { return true }
            s.throttled = true
            return false
        }
    }

    func write(_ bytes: UnsafeRawBufferPointer) {
        state.withLock { s in
            s.received += UInt64(bytes.count)
            guard var sink = s.sink else { return }
            var take = UInt64(bytes.count)
            if let limit = sink.limit { take = min(take, limit > sink.kept ? limit - sink.kept : 0) }
            sink.dropped += UInt64(bytes.count) - take
            sink.kept += take
            if take > 0 { s.buffer.append(contentsOf: bytes.prefix(Int(take))) }
            s.sink = sink
        }
        wake.signal()
        progress?()
    }

    private func writerLoop() {
        while true {
            wake.wait()
            while true {
                let (chunk, fd, closed) = state.withLock { s -> ([UInt8], OwnedFileDescriptor?, Bool) in
                    let c = s.buffer
                    s.buffer.removeAll(keepingCapacity: true)
                    s.delivering = !c.isEmpty
                    s.inFlight = c.count
                    return (c, s.sink?.descriptor, s.closed)
                }
                if chunk.isEmpty {
                    if closed { return }
                    break
                }
                // A reader that went away (EPIPE) must not stop the run: its bytes are dropped.
                if let fd { chunk.withUnsafeBytes { try? fd.writeAll($0) } }
                let wasThrottled = state.withLock { s -> Bool in
                    s.delivering = false
                    s.inFlight = 0
                    if s.sink != nil && fd != nil {
                        s.sink!.delivered += UInt64(chunk.count)
                        s.sink!.lastByte = chunk.last
                    }
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
