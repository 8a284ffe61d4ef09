import Synchronization
import Testing
@testable import VMM

/// Records the accesses that reach it and answers reads with a fixed value.
private final class AccessLog: BusDevice {
    private let log = Mutex<[String]>([])
    let answer: UInt64
    init(answer: UInt64 = 0x1122_3344_5566_7788) { self.answer = answer }
    func read(offset: UInt64, size: Int) -> UInt64 {
        log.withLock { $0.append("r \(offset) \(size)") }
        return answer
    }
    func write(offset: UInt64, size: Int, value: UInt64) {
        log.withLock { $0.append("w \(offset) \(size) \(String(value, radix: 16))") }
    }
    var entries: [String] { log.withLock { $0 } }
}

@Suite struct BusTests {
    /// A bus with one device at 0x100-0x10F.
    func busWithOneDevice() throws -> Bus {
        var bus = Bus(name: "test")
        try bus.insert(AccessLog(), name: "d", base: 0x100, length: 0x10)
        return bus
    }

    @Test(arguments: [
        (0x100, 0x10),  // the same range
        (0xF8, 0x10),   // overlapping the start from below
        (0xFF, 2),      // overlapping only the first byte
        (0x108, 0x10),  // overlapping the end from above
        (0x10F, 1),     // only the last byte
        (0x104, 0x4),   // inside it
        (0xF0, 0x40),   // around it
        (0x100, 1),     // sharing its base
    ] as [(UInt64, UInt64)])
    func overlapsAreRejected(base: UInt64, length: UInt64) throws {
        var bus = try busWithOneDevice()
        #expect(throws: BusError.overlap(name: "x", base: base, length: length, existing: "d at 0x100+0x10")) {
            try bus.insert(AccessLog(), name: "x", base: base, length: length)
        }
        #expect(bus.entries.count == 1)
    }

    @Test func adjacentRangesAreAcceptedInAnyOrder() throws {
        var bus = try busWithOneDevice()
        try bus.insert(AccessLog(), name: "above", base: 0x110, length: 0x10)
        try bus.insert(AccessLog(), name: "below", base: 0xF0, length: 0x10)
        try bus.insert(AccessLog(), name: "far", base: 0x1000, length: 1)
        try bus.insert(AccessLog(), name: "low", base: 0, length: 1)
        #expect(bus.entries.map(\.name) == ["low", "below", "d", "above", "far"])
        #expect(bus.entries.map(\.base) == [0, 0xF0, 0x100, 0x110, 0x1000])
    }

    @Test func emptyAndOverflowingRangesAreRejected() throws {
        var bus = Bus(name: "test")
        #expect(throws: BusError.emptyRange(name: "x", base: 5)) {
            try bus.insert(AccessLog(), name: "x", base: 5, length: 0)
        }
        #expect(throws: BusError.rangeOverflows(name: "x", base: .max, length: 2)) {
            try bus.insert(AccessLog(), name: "x", base: .max, length: 2)
        }
        #expect(throws: BusError.rangeOverflows(name: "x", base: 2, length: .max)) {
            try bus.insert(AccessLog(), name: "x", base: 2, length: .max)
        }
        #expect(bus.entries.isEmpty)
        // Ranges may end on the last address.
        try bus.insert(AccessLog(), name: "top", base: .max, length: 1)
        try bus.insert(AccessLog(), name: "all-below", base: 0, length: .max)
        #expect(bus.resolve(.max, size: 1)?.offset == 0)
        #expect(bus.resolve(UInt64.max - 1, size: 1)?.offset == UInt64.max - 1)
    }

    @Test func devicesSeeOffsetsRelativeToTheirBase() throws {
        let uart = AccessLog(answer: 0xAB)
        let other = AccessLog()
        var bus = Bus(name: "ports")
        try bus.insert(other, name: "other", base: 0x60, length: 5)
        try bus.insert(uart, name: "uart", base: 0x3F8, length: 8)
        #expect(bus.read(0x3FD, size: 1) == 0xAB)
        #expect(bus.write(0x3F8, size: 1, value: 0x41))
        #expect(bus.write(0x3FF, size: 1, value: 0x42))
        #expect(bus.write(0x64, size: 1, value: 0xFE))
        #expect(uart.entries == ["r 5 1", "w 0 1 41", "w 7 1 42"])
        #expect(other.entries == ["w 4 1 fe"])
        let resolved = bus.resolve(0x3FC, size: 4)
        #expect(resolved?.offset == 4)
        #expect(resolved?.device === uart)
    }

    @Test func addressesOutsideEveryDeviceResolveToNothing() throws {
        var bus = try busWithOneDevice()
        try bus.insert(AccessLog(), name: "e", base: 0x200, length: 0x10)
        for address: UInt64 in [0, 0xFF, 0x110, 0x1FF, 0x210, .max] {
            #expect(bus.resolve(address, size: 1) == nil, "0x\(String(address, radix: 16))")
        }
        #expect(Bus(name: "empty").resolve(0x100, size: 1) == nil)
    }

    @Test func accessesRunningPastTheEndOfADeviceAreUnclaimed() throws {
        let dev = AccessLog()
        var bus = Bus(name: "test")
        try bus.insert(dev, name: "d", base: 0x1000, length: 0x10)
        try bus.insert(AccessLog(), name: "next", base: 0x1010, length: 0x10)
        #expect(bus.resolve(0x100C, size: 4)?.offset == 0xC)  // ends on the last byte
        #expect(bus.resolve(0x100E, size: 4) == nil)
        #expect(bus.resolve(0x100F, size: 2) == nil)  // even with a device right after it
        #expect(bus.read(0x100E, size: 4) == 0xFFFF_FFFF)
        #expect(!bus.write(0x100F, size: 2, value: 0))
        #expect(dev.entries.isEmpty)
    }

    @Test func accessesWiderThanTheDeviceAreUnclaimed() throws {
        var bus = Bus(name: "test")
        try bus.insert(AccessLog(), name: "one", base: 0x80, length: 1)
        try bus.insert(AccessLog(), name: "five", base: 0x60, length: 5)
        #expect(bus.resolve(0x80, size: 2) == nil)
        #expect(bus.resolve(0x80, size: 8) == nil)
        #expect(bus.read(0x60, size: 8) == .max)
        #expect(!bus.write(0x80, size: 4, value: 1))
        #expect(bus.resolve(0x80, size: 0) == nil)
    }

    @Test(arguments: [(1, 0xFF), (2, 0xFFFF), (4, 0xFFFF_FFFF), (8, UInt64.max)] as [(Int, UInt64)])
    func unclaimedReadsAreAllOnesOfTheAccessSize(size: Int, expected: UInt64) throws {
        let bus = try busWithOneDevice()
        #expect(bus.read(0x80, size: size) == expected)
        #expect(!bus.write(0x80, size: size, value: 0))
    }

    @Test func valuesAreMaskedToTheAccessSize() throws {
        let dev = AccessLog(answer: 0x1122_3344_5566_7788)
        var bus = Bus(name: "test")
        try bus.insert(dev, name: "d", base: 0, length: 16)
        #expect(bus.read(0, size: 1) == 0x88)
        #expect(bus.read(0, size: 2) == 0x7788)
        #expect(bus.read(0, size: 4) == 0x5566_7788)
        #expect(bus.read(8, size: 8) == 0x1122_3344_5566_7788)
        #expect(bus.write(2, size: 2, value: 0xAAAA_BBBB))
        #expect(bus.write(4, size: 1, value: 0x1FF))
        #expect(dev.entries.suffix(2) == ["w 2 2 bbbb", "w 4 1 ff"])
    }

    @Test func lookupsFindEachOfManyDevices() throws {
        var bus = Bus(name: "mmio")
        var devices: [UInt64: AccessLog] = [:]
        // 37 is coprime to 64: every slot once, out of order.
        for i in (0..<64).map({ $0 * 37 % 64 }) {
            let dev = AccessLog()
            let base = 0xD000_0000 + UInt64(i) * 0x1000
            devices[base] = dev
            try bus.insert(dev, name: "dev\(i)", base: base, length: 0x200)
        }
        #expect(bus.entries.map(\.base) == bus.entries.map(\.base).sorted())
        for (base, dev) in devices {
            #expect(bus.resolve(base, size: 4)?.device === dev)
            #expect(bus.resolve(base + 0x1FC, size: 4)?.offset == 0x1FC)
            #expect(bus.resolve(base + 0x200, size: 4) == nil)  // the gap after it
        }
    }
}
