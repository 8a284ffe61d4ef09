import Foundation
import GuestMemory
import Synchronization
@testable import Virtio

final class RecordingLine: InterruptLine {
    let levels = Mutex<[Bool]>([])
    func setLevel(_ high: Bool) { levels.withLock { $0.append(high) } }
    var high: Bool { levels.withLock { $0.last ?? false } }
}

/// A virtio driver written against the spec, in guest memory, to drive the
/// transport and devices without a guest. Rings live at fixed addresses.
final class MockDriver {
    let memory: GuestMemory
    let transport: MMIOTransport
    let line = RecordingLine()
    let queueSize: UInt16
    static let desc = GuestAddress(0x10000)
    static let avail = GuestAddress(0x20000)
    static let used = GuestAddress(0x30000)
    /// Scratch buffers for requests start here.
    static let buffers: UInt64 = 0x40000
    var availIndex: UInt16 = 0
    var usedSeen: UInt16 = 0

    init(device: any VirtioDevice, memory: GuestMemory? = nil, queueSize: UInt16 = 16) throws {
        self.memory = try memory ?? GuestMemory(layout: [(GuestAddress(0), 16 << 20)])
        self.queueSize = queueSize
        transport = MMIOTransport(device: device, memory: self.memory, interrupt: line)
    }

    /// The same driver (rings, indices) talking to another transport: a restored one.
    init(continuing other: MockDriver, on transport: MMIOTransport) {
        memory = other.memory
        queueSize = other.queueSize
        self.transport = transport
        availIndex = other.availIndex
        usedSeen = other.usedSeen
    }

    func r(_ offset: UInt64, size: Int = 4) -> UInt64 { transport.read(offset: offset, size: size) }
    func w(_ offset: UInt64, _ value: UInt64, size: Int = 4) { transport.write(offset: offset, size: size, value: value) }
    var status: UInt32 { UInt32(r(0x70)) }

    var deviceFeatures: UInt64 {
        w(0x14, 0); let low = r(0x10)
        w(0x14, 1); let high = r(0x10)
        return low | high << 32
    }

    func negotiate(_ features: UInt64? = nil) {
        w(0x70, 0)
        w(0x70, 1); w(0x70, 1 | 2)
        let f = features ?? deviceFeatures
        w(0x24, 0); w(0x20, f & 0xFFFF_FFFF)
        w(0x24, 1); w(0x20, f >> 32)
        w(0x70, 1 | 2 | 8)
    }

    func setUpQueue(_ index: UInt32 = 0, size: UInt16? = nil, desc: GuestAddress = MockDriver.desc,
                    avail: GuestAddress = MockDriver.avail, used: GuestAddress = MockDriver.used) {
        w(0x30, UInt64(index))
        w(0x38, UInt64(size ?? queueSize))
        w(0x80, desc.raw & 0xFFFF_FFFF); w(0x84, desc.raw >> 32)
        w(0x90, avail.raw & 0xFFFF_FFFF); w(0x94, avail.raw >> 32)
        w(0xA0, used.raw & 0xFFFF_FFFF); w(0xA4, used.raw >> 32)
        w(0x44, 1)
    }

    /// Full bring-up: negotiate, one queue, DRIVER_OK.
    func start(features: UInt64? = nil) {
        negotiate(features)
        setUpQueue()
        w(0x70, 1 | 2 | 8 | 4)
    }

    /// Writes descriptor `i`.
    func descriptor(_ i: UInt16, addr: UInt64, len: UInt32, flags: UInt16, next: UInt16 = 0) throws {
        let at = MockDriver.desc.raw + UInt64(i) * 16
        try memory.write(addr, at: GuestAddress(at))
        try memory.write(len, at: GuestAddress(at + 8))
        try memory.write(flags, at: GuestAddress(at + 12))
        try memory.write(next, at: GuestAddress(at + 14))
    }

    /// Makes `head` available and notifies queue 0.
    func submit(_ head: UInt16, notify: Bool = true) throws {
        try memory.write(head, at: GuestAddress(MockDriver.avail.raw + 4 + 2 * UInt64(availIndex % queueSize)))
        availIndex &+= 1
        try memory.write(availIndex, at: GuestAddress(MockDriver.avail.raw + 2))
        if notify { w(0x50, 0) }
    }

    /// Used elements published since the last call.
    func takeUsed() throws -> [(id: UInt32, len: UInt32)] {
        let idx = try memory.read(UInt16.self, at: GuestAddress(MockDriver.used.raw + 2))
        var out: [(UInt32, UInt32)] = []
        while usedSeen != idx {
            let at = MockDriver.used.raw + 4 + 8 * UInt64(usedSeen % queueSize)
            out.append((try memory.read(UInt32.self, at: GuestAddress(at)), try memory.read(UInt32.self, at: GuestAddress(at + 4))))
            usedSeen &+= 1
        }
        return out
    }

    /// Acknowledges all pending interrupts.
    func ack() { w(0x64, r(0x60)) }

    // virtio-blk requests: header at buffers, data after it, status byte last.
    static let header = GuestAddress(buffers)
    static let data = GuestAddress(buffers + 0x1000)
    static let statusByte = GuestAddress(buffers + 0x100)

    /// A 3-descriptor block request (header, data, status) starting at descriptor `first`.
    func blockRequest(type: UInt32, sector: UInt64, dataLength: UInt32, first: UInt16 = 0) throws -> UInt16 {
        try memory.write(type, at: MockDriver.header)
        try memory.write(UInt32(0), at: GuestAddress(MockDriver.header.raw + 4))
        try memory.write(sector, at: GuestAddress(MockDriver.header.raw + 8))
        try memory.write(UInt8(0xFF), at: MockDriver.statusByte)
        let dataWritable: UInt16 = type == 0 || type == 8 ? 2 : 0
        if dataLength > 0 {
            try descriptor(first, addr: MockDriver.header.raw, len: 16, flags: 1, next: first + 1)
            try descriptor(first + 1, addr: MockDriver.data.raw, len: dataLength, flags: 1 | dataWritable, next: first + 2)
            try descriptor(first + 2, addr: MockDriver.statusByte.raw, len: 1, flags: 2)
        } else {
            try descriptor(first, addr: MockDriver.header.raw, len: 16, flags: 1, next: first + 1)
            try descriptor(first + 1, addr: MockDriver.statusByte.raw, len: 1, flags: 2)
        }
        return first
    }

    func requestStatus() throws -> UInt8 { try memory.read(UInt8.self, at: MockDriver.statusByte) }
}

/// A temporary disk image that removes itself.
final class TempDisk {
    let path: String
    init(sectors: Int, fill: (Int) -> UInt8 = { UInt8(truncatingIfNeeded: $0 / 512) }) throws {
        path = NSTemporaryDirectory() + "airlock-disk-\(UUID().uuidString).img"
        let bytes = (0..<(sectors * 512)).map(fill)
        try Data(bytes).write(to: URL(fileURLWithPath: path))
    }
    var contents: [UInt8] { (try? [UInt8](Data(contentsOf: URL(fileURLWithPath: path)))) ?? [] }
    deinit { try? FileManager.default.removeItem(atPath: path) }
}
