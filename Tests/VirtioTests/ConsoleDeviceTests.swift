import GuestMemory
import Testing
@testable import Virtio
@testable import VirtioDevices
#if canImport(Glibc)
import Glibc
#endif

/// A driver for several queues: each queue gets its own rings and buffers.
final class MultiQueueDriver {
    let memory: GuestMemory
    let transport: MMIOTransport
    let line = RecordingLine()
    let size: UInt16 = 8
    var availIndex: [Int: UInt16] = [:]
    var usedSeen: [Int: UInt16] = [:]

    init(device: any VirtioDevice) throws {
        memory = try GuestMemory(layout: [(GuestAddress(0), 16 << 20)])
        transport = MMIOTransport(device: device, memory: memory, interrupt: line)
    }

    func w(_ o: UInt64, _ v: UInt64) { transport.write(offset: o, size: 4, value: v) }
    func r(_ o: UInt64) -> UInt64 { transport.read(offset: o, size: 4) }

    // Queue q's rings and buffers live in a 64 KiB block at 1 MiB + q * 64 KiB.
    func base(_ q: Int) -> UInt64 { 0x10_0000 + UInt64(q) * 0x1_0000 }
    func desc(_ q: Int) -> UInt64 { base(q) }
    func avail(_ q: Int) -> UInt64 { base(q) + 0x1000 }
    func used(_ q: Int) -> UInt64 { base(q) + 0x2000 }
    func buffer(_ q: Int, _ i: UInt16) -> UInt64 { base(q) + 0x4000 + UInt64(i) * 0x1000 }

    func start(queues: Int, features: UInt64) {
        w(0x70, 0); w(0x70, 1); w(0x70, 3)
        w(0x24, 0); w(0x20, features & 0xFFFF_FFFF)
        w(0x24, 1); w(0x20, features >> 32)
        w(0x70, 11)
        for q in 0..<queues {
            w(0x30, UInt64(q)); w(0x38, UInt64(size))
            w(0x80, desc(q)); w(0x84, 0); w(0x90, avail(q)); w(0x94, 0); w(0xA0, used(q)); w(0xA4, 0)
            w(0x44, 1)
        }
        w(0x70, 15)
    }

    /// Posts a one-descriptor buffer on queue q (writable for the device when `writable`), holding `bytes`.
    /// `readableLength` claims more than `bytes` for a readable buffer (a hostile length over guest RAM).
    func post(_ q: Int, bytes: [UInt8] = [], length: UInt32 = 4096, writable: Bool, notify: Bool = true,
              readableLength: UInt32? = nil) throws {
        let i = availIndex[q, default: 0]
        let slot = i % size
        try memory.write(bytes, at: GuestAddress(buffer(q, slot)))
        let d = desc(q) + UInt64(slot) * 16
        try memory.write(buffer(q, slot), at: GuestAddress(d))
        try memory.write(writable ? length : readableLength ?? UInt32(bytes.count), at: GuestAddress(d + 8))
        try memory.write(UInt16(writable ? 2 : 0), at: GuestAddress(d + 12))
        try memory.write(slot, at: GuestAddress(avail(q) + 4 + 2 * UInt64(slot)))
        availIndex[q] = i &+ 1
        try memory.write(i &+ 1, at: GuestAddress(avail(q) + 2))
        if notify { w(0x50, UInt64(q)) }
    }

    /// The contents of buffers the device returned on queue q since the last call.
    func received(_ q: Int) throws -> [[UInt8]] {
        let idx = try memory.read(UInt16.self, at: GuestAddress(used(q) + 2))
        var out: [[UInt8]] = []
        while usedSeen[q, default: 0] != idx {
            let at = used(q) + 4 + 8 * UInt64(usedSeen[q, default: 0] % size)
            let id = try memory.read(UInt32.self, at: GuestAddress(at))
            let len = try memory.read(UInt32.self, at: GuestAddress(at + 4))
            out.append(try memory.readBytes(at: GuestAddress(buffer(q, UInt16(id))), count: Int(len)))
            usedSeen[q] = usedSeen[q, default: 0] &+ 1
        }
        return out
    }

    static func control(id: UInt32, event: UInt16, value: UInt16) -> [UInt8] {
        withUnsafeBytes(of: id.littleEndian, Array.init) + withUnsafeBytes(of: event.littleEndian, Array.init)
            + withUnsafeBytes(of: value.littleEndian, Array.init)
    }
}

@Suite struct ConsoleDeviceTests {
    let stdout = BoundedCapture(limit: 64)
    let console: ConsoleDevice
    let driver: MultiQueueDriver
    static let features = VirtioFeature.version1 | ConsoleDevice.multiportFeature

    init() throws {
        console = ConsoleDevice(ports: [.init(name: "airlock.control", output: nil),
                                        .init(name: "airlock.stdout", output: stdout)])
        driver = try MultiQueueDriver(device: console)
        driver.start(queues: 6, features: Self.features)
    }

    func event(_ m: [UInt8]) -> (UInt32, UInt16, UInt16) {
        (UInt32(m[0]) | UInt32(m[1]) << 8, UInt16(m[4]) | UInt16(m[5]) << 8, UInt16(m[6]) | UInt16(m[7]) << 8)
    }

    @Test func advertisesMultiportAndItsPorts() {
        #expect(driver.r(0x08) == 3)
        driver.w(0x14, 0)
        #expect(driver.r(0x10) & 2 != 0)
        #expect(driver.transport.read(offset: 0x104, size: 4) == 2)  // max_nr_ports
        driver.w(0x30, 5)
        #expect(driver.r(0x34) == UInt64(ConsoleDevice.queueSize))
        driver.w(0x30, 6)
        #expect(driver.r(0x34) == 0)
    }

    @Test func deviceReadyAddsEveryPortThenPortsGetNamesAndOpen() throws {
        for _ in 0..<6 { try driver.post(2, writable: true, notify: false) }
        try driver.post(3, bytes: MultiQueueDriver.control(id: 0, event: 0, value: 1), writable: false)
        let adds = try driver.received(2).map(event)
        #expect(adds.map(\.0) == [0, 1] && adds.allSatisfy { $0.1 == 1 })

        try driver.post(3, bytes: MultiQueueDriver.control(id: 1, event: 3, value: 1), writable: false)
        let replies = try driver.received(2)
        #expect(replies.count == 2)
        #expect(event(replies[0]).1 == 7 && Array(replies[0].dropFirst(8)) == Array("airlock.stdout".utf8))
        #expect(event(replies[1]) == (1, 6, 1))
        #expect(driver.line.high)
    }

    @Test func controlMessagesWaitForReceiveBuffers() throws {
        try driver.post(3, bytes: MultiQueueDriver.control(id: 0, event: 0, value: 1), writable: false)
        #expect(try driver.received(2).isEmpty)
        try driver.post(2, writable: true)
        try driver.post(2, writable: true)
        #expect(try driver.received(2).count == 2)
    }

    @Test func guestOutputReachesThePortAndIsBounded() throws {
        try driver.post(5, bytes: Array("hello ".utf8), writable: false)
        try driver.post(5, bytes: Array("world".utf8), writable: false)
        #expect(String(decoding: stdout.bytes, as: UTF8.self) == "hello world")
        try driver.post(5, bytes: [UInt8](repeating: 0x41, count: 100), writable: false)
        #expect(stdout.bytes.count == 64 && stdout.droppedBytes == 100 - 53)
    }

    /// One chain may carry at most `transmitChainLimit` bytes of output: a
    /// 4 MiB buffer (all of it guest RAM) hands the port 1 MiB, the rest is counted.
    @Test func oneTransmitChainCarriesAtMostTheLimit() throws {
        try driver.post(5, bytes: [0x41], writable: false, readableLength: 4 << 20)
        #expect(stdout.bytes.count == 64)
        #expect(stdout.droppedBytes == ConsoleDevice.transmitChainLimit - 64)
        #expect(console.oversizedTransmitBytes == UInt64((4 << 20) - ConsoleDevice.transmitChainLimit))
        // The queue goes on: the next chain is delivered as usual.
        #expect(try driver.received(5).count == 1)
    }

    @Test func hostInputWaitsForTheGuestToOpenThePort() throws {
        #expect(console.queueInput(port: 1, Array("input".utf8)) == 5)
        try driver.post(4, writable: true)
        driver.transport.serviceQueue(ConsoleDevice.receiveQueue(port: 1))
        #expect(try driver.received(4).isEmpty)     // not open yet
        try driver.post(3, bytes: MultiQueueDriver.control(id: 1, event: 6, value: 1), writable: false)
        #expect(try driver.received(4) == [Array("input".utf8)])
    }

    @Test func hostInputLargerThanABufferIsSplitInOrder() throws {
        try driver.post(3, bytes: MultiQueueDriver.control(id: 1, event: 6, value: 1), writable: false)
        console.queueInput(port: 1, Array("abcdefghij".utf8))
        try driver.post(4, length: 4, writable: true, notify: false)
        try driver.post(4, length: 4, writable: true, notify: false)
        try driver.post(4, length: 4, writable: true)
        #expect(try driver.received(4) == [Array("abcd".utf8), Array("efgh".utf8), Array("ij".utf8)])
    }

    @Test func hostInputIsBounded() {
        let big = [UInt8](repeating: 1, count: ConsoleDevice.inputCapacity + 10)
        #expect(console.queueInput(port: 1, big) == ConsoleDevice.inputCapacity)
        #expect(console.queueInput(port: 1, [1]) == 0)
    }

    @Test func malformedControlMessagesAreIgnored() throws {
        try driver.post(2, writable: true, notify: false)
        try driver.post(3, bytes: [1, 2, 3], writable: false)                                          // short
        try driver.post(3, bytes: MultiQueueDriver.control(id: 99, event: 3, value: 1), writable: false)  // no such port
        try driver.post(3, bytes: MultiQueueDriver.control(id: 0xFFFF_FFFF, event: 6, value: 1), writable: false)
        #expect(try driver.received(2).isEmpty)
        // The device still works.
        try driver.post(3, bytes: MultiQueueDriver.control(id: 0, event: 0, value: 1), writable: false)
        #expect(try driver.received(2).count == 1)
    }

    @Test func resetForgetsPortState() throws {
        try driver.post(3, bytes: MultiQueueDriver.control(id: 1, event: 6, value: 1), writable: false)
        #expect(console.isOpenInGuest(port: 1))
        driver.w(0x70, 0)
        #expect(!console.isOpenInGuest(port: 1))
    }
}
