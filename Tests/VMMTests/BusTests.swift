import Testing
@testable import VMM

@Suite struct BusTests {
    func bus(_ ranges: [(UInt64, UInt64)]) throws -> Bus {
        var b = Bus(name: "test")
        for (i, (base, length)) in ranges.enumerated() { try b.insert(Recorder(), name: "d\(i)", base: base, length: length) }
        return b
    }

    @Test func overlapsAreRejectedFromEitherSide() throws {
        var b = try bus([(0x100, 0x10)])
        for (base, length): (UInt64, UInt64) in [(0x100, 0x10), (0xF8, 0x10), (0x108, 0x10), (0x104, 0x4), (0xF0, 0x40), (0x10F, 1)] {
            #expect(throws: BusError.self) { try b.insert(Recorder(), name: "x", base: base, length: length) }
        }
        try b.insert(Recorder(), name: "below", base: 0xF0, length: 0x10)   // adjacent is fine
        try b.insert(Recorder(), name: "above", base: 0x110, length: 0x10)
        #expect(b.entries.map(\.base) == [0xF0, 0x100, 0x110])
    }

    @Test func emptyAndOverflowingRangesAreRejected() {
        var b = Bus(name: "test")
        #expect(throws: BusError.emptyRange(name: "x", base: 5)) { try b.insert(Recorder(), name: "x", base: 5, length: 0) }
        #expect(throws: BusError.self) { try b.insert(Recorder(), name: "x", base: .max, length: 2) }
        #expect((try? b.insert(Recorder(), name: "top", base: .max, length: 1)) != nil)
    }

    @Test func devicesSeeRelativeOffsets() throws {
        let dev = Recorder(answer: 0xAB)
        var b = Bus(name: "test")
        try b.insert(dev, name: "d", base: 0x3F8, length: 8)
        #expect(b.read(0x3FD, size: 1) == 0xAB)
        #expect(b.write(0x3F8, size: 1, value: 0x41))
        #expect(dev.entries == ["r 5 1", "w 0 1 41"])
    }

    @Test func accessesStraddlingTheEndBelongToNobody() throws {
        let dev = Recorder()
        var b = Bus(name: "test")
        try b.insert(dev, name: "d", base: 0x1000, length: 0x10)
        #expect(b.resolve(0x100E, size: 4) == nil)
        #expect(b.resolve(0x100C, size: 4) != nil)
        #expect(!b.write(0x100F, size: 2, value: 0))
        #expect(dev.entries.isEmpty)
    }

    @Test func unclaimedReadsAreAllOnesOfTheAccessSize() throws {
        let b = try bus([(0x100, 0x10)])
        #expect(b.read(0x80, size: 1) == 0xFF)
        #expect(b.read(0x80, size: 2) == 0xFFFF)
        #expect(b.read(0x80, size: 4) == 0xFFFF_FFFF)
        #expect(b.read(0x80, size: 8) == UInt64.max)
        #expect(!b.write(0x80, size: 1, value: 0))
    }

    @Test func readsAreMaskedToTheAccessSize() throws {
        var b = Bus(name: "test")
        try b.insert(Recorder(answer: 0x1122_3344_5566_7788), name: "d", base: 0, length: 16)
        #expect(b.read(0, size: 1) == 0x88)
        #expect(b.read(0, size: 2) == 0x7788)
    }
}
