import AgentProtocol
import AirlockOS
import Dispatch
import Foundation
import Synchronization
import Testing
@testable import SandboxEngine

/// The VMM side of a run without a VM: output routing and its bounds,
/// control-channel decoding, the controller's inbox.
struct OutputPumpTests {
    func feed(_ pump: OutputPump, _ bytes: [UInt8]) {
        bytes.withUnsafeBytes { pump.write($0) }
    }

    /// A pipe whose read end a thread drains into `got`; `take()` hands out the write end once.
    final class Drain: @unchecked Sendable {
        private var write: OwnedFileDescriptor?
        private let read: OwnedFileDescriptor
        private let got = Box()
        private let done = DispatchSemaphore(value: 0)
        final class Box: Sendable { let bytes = Mutex<[UInt8]>([]) }
        init() throws {
            var fds: [Int32] = [0, 0]
            try #require(pipe(&fds) == 0)
            read = OwnedFileDescriptor(adopting: fds[0])
            write = OwnedFileDescriptor(adopting: fds[1])
            let r = read, got = self.got, done = self.done
            try startThread {
                var buf = [UInt8](repeating: 0, count: 4096)
                while true {
                    let n = buf.withUnsafeMutableBytes { Foundation.read(r.rawValue, $0.baseAddress, $0.count) }
                    if n <= 0 { break }
                    got.bytes.withLock { $0 += buf[0..<n] }
                }
                done.signal()
            }
        }
        func take() -> OwnedFileDescriptor {
            defer { write = nil }
            return write!
        }
        /// Everything, once every write end is closed.
        func all() -> [UInt8] {
            done.wait()
            return got.bytes.withLock { $0 }
        }
    }

    @Test func aDescriptorGetsEveryByteInOrderAndTheCountsAreKept() throws {
        let pump = OutputPump(name: "test")
        try pump.start()
        let drain = try Drain()
        pump.begin(drain.take(), limit: nil)
        let payload = (0..<200_000).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        for chunk in stride(from: 0, to: payload.count, by: 7000) {
            feed(pump, Array(payload[chunk..<min(payload.count, chunk + 7000)]))
        }
        while !pump.idle { usleep(1000) }
        let totals = pump.finish()
        #expect(drain.all() == payload, "finish lets go of the descriptor: the reader sees EOF")
        #expect(totals.delivered == UInt64(payload.count) && totals.dropped == 0)
        pump.close()
    }

    @Test func theLimitCutsTheStreamAndCountsWhatWasDropped() throws {
        let pump = OutputPump(name: "test")
        try pump.start()
        let drain = try Drain()
        pump.begin(drain.take(), limit: 10)
        feed(pump, Array(repeating: 65, count: 6))
        feed(pump, Array(repeating: 66, count: 6) + [10])
        while !pump.idle { usleep(1000) }
        let totals = pump.finish()
        pump.close()
        #expect(totals == OutputPump.Totals(delivered: 10, dropped: 3, endsMidLine: true))
        #expect(pump.received == 13, "the count matches what the guest sent, kept or not")
    }

    @Test func bytesBeforeAnyRunAreCountedAndDropped() throws {
        let pump = OutputPump(name: "test")
        feed(pump, [1, 2, 3])
        #expect(pump.received == 3)
        #expect(pump.finish() == OutputPump.Totals())
    }

    @Test func aStreamEndingInANewlineIsNotMidLine() throws {
        let pump = OutputPump(name: "test")
        try pump.start()
        let drain = try Drain()
        pump.begin(drain.take(), limit: nil)
        feed(pump, Array("line\n".utf8))
        while !pump.idle { usleep(1000) }
        #expect(pump.finish().endsMidLine == false)
        pump.close()
    }

    /// A consumer that is behind makes the device stop taking guest buffers
    /// (acceptsMore is false) and is told to resume once it has caught up.
    @Test func aSlowConsumerThrottlesTheGuestAndResumesIt() throws {
        var fds: [Int32] = [0, 0]
        try #require(pipe(&fds) == 0)
        let read = OwnedFileDescriptor(adopting: fds[0]), write = OwnedFileDescriptor(adopting: fds[1])
        let pump = OutputPump(name: "test")
        let resumed = Atomic<Int>(0)
        pump.resume = { resumed.add(1, ordering: .relaxed) }
        try pump.start()
        pump.begin(write, limit: nil)
        // Nobody reads yet: the pipe fills (64 KiB) and the writer blocks with the rest buffered.
        feed(pump, [UInt8](repeating: 1, count: OutputPump.highWater + (128 << 10)))
        #expect(pump.acceptsMore == false)
        var buf = [UInt8](repeating: 0, count: 1 << 16)
        var total = 0
        while total < OutputPump.highWater + (128 << 10) {
            let n = buf.withUnsafeMutableBytes { Foundation.read(read.rawValue, $0.baseAddress, $0.count) }
            if n <= 0 { break }
            total += n
        }
        while !pump.idle { usleep(1000) }
        #expect(pump.acceptsMore)
        #expect(resumed.load(ordering: .relaxed) >= 1)
        _ = pump.finish()
        pump.close()
    }
}

struct ControlChannelTests {
    final class Sink: Sendable {
        let events = Mutex<[VMSession.Event]>([])
        func post(_ e: VMSession.Event) { events.withLock { $0.append(e) } }
        var messages: [GuestMessage] {
            events.withLock { $0.compactMap { if case let .guest(m) = $0 { return m } else { return nil } } }
        }
        var errors: Int { events.withLock { $0.filter { if case .protocolError = $0 { return true } else { return false } }.count } }
    }

    @Test func framesSplitAcrossWritesAreReassembled() {
        let sink = Sink()
        let channel = ControlChannel(post: sink.post)
        let stream = GuestMessage.hello(version: AgentProtocol.version, agent: "a").encoded()
            + GuestMessage.started(runID: 1, pid: 9).encoded()
        for b in stream { [b].withUnsafeBytes { channel.write($0) } }
        #expect(sink.messages == [.hello(version: AgentProtocol.version, agent: "a"), .started(runID: 1, pid: 9)])
    }

    @Test func aMalformedFrameIsReportedOnceAndTheRestIgnored() {
        let sink = Sink()
        let channel = ControlChannel(post: sink.post)
        let bad = Frame.encode(type: 0x99, body: [])
        (bad + GuestMessage.started(runID: 1, pid: 9).encoded()).withUnsafeBytes { channel.write($0) }
        GuestMessage.started(runID: 2, pid: 9).encoded().withUnsafeBytes { channel.write($0) }
        #expect(sink.errors == 1)
        #expect(sink.messages.isEmpty)
    }

    @Test func aFloodingGuestCannotGrowTheInbox() {
        let queue = EventQueue()
        for i in 0..<(VMSession.maxPendingEvents * 3) { queue.post(.guest(.started(runID: UInt32(i), pid: 1))) }
        queue.post(.progress)
        queue.post(.progress)
        var count = 0, errors = 0
        while let e = queue.next(until: 0) {
            count += 1
            if case .protocolError = e { errors += 1 }
        }
        #expect(count == VMSession.maxPendingEvents + 1)
        #expect(errors == 1)
    }
}

extension ControlChannelTests {
    @Test func progressWakeUpsCoalesce() {
        let queue = EventQueue()
        for _ in 0..<100 { queue.post(.progress) }
        var count = 0
        while queue.next(until: 0) != nil { count += 1 }
        #expect(count == 1)
        // Once the pending one is taken, the next progress wakes the controller again.
        queue.post(.progress)
        #expect(queue.next(until: 0) != nil)
    }

    /// One write packed with more messages than the event queue holds is stopped
    /// where it is decoded, not turned into millions of messages.
    @Test func oneWritePackedWithMessagesIsAFlood() {
        let sink = Sink()
        let channel = ControlChannel(post: sink.post)
        let frame = GuestMessage.started(runID: 1, pid: 9).encoded()
        let packed = [[UInt8]](repeating: frame, count: VMSession.maxPendingEvents + 10).flatMap { $0 }
        packed.withUnsafeBytes { channel.write($0) }
        #expect(sink.messages.count == VMSession.maxPendingEvents)
        #expect(sink.errors == 1)
    }
}


func startThread(_ body: @escaping @Sendable () -> Void) throws {
    let t = Thread(block: body)
    t.start()
}
