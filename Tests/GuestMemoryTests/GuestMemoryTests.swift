import Testing
@testable import GuestMemory

@Suite struct GuestMemoryTests {
    func twoRegions() throws -> GuestMemory {
        // 1 MiB at 0, a hole, 1 MiB at 4 MiB.
        try GuestMemory(layout: [(GuestAddress(0), 1 << 20), (GuestAddress(4 << 20), 1 << 20)])
    }

    @Test func readsBackWhatWasWritten() throws {
        let m = try twoRegions()
        try m.write([1, 2, 3, 4], at: GuestAddress(0x1000))
        #expect(try m.readBytes(at: GuestAddress(0x1000), count: 4) == [1, 2, 3, 4])
        try m.write(UInt32(0xDEAD_BEEF), at: GuestAddress((4 << 20) + 3))
        #expect(try m.read(UInt32.self, at: GuestAddress((4 << 20) + 3)) == 0xDEAD_BEEF)
        #expect(try m.readBytes(at: GuestAddress((4 << 20) + 3), count: 4) == [0xEF, 0xBE, 0xAD, 0xDE])
    }

    @Test func rejectsRangesOutsideRAM() throws {
        let m = try twoRegions()
        #expect(throws: GuestMemoryError.outOfBounds(address: GuestAddress(1 << 20), length: 1)) {
            try m.write([0], at: GuestAddress(1 << 20))
        }
        // Straddles the end of the first region into the hole.
        #expect(throws: GuestMemoryError.self) { try m.readBytes(at: GuestAddress((1 << 20) - 2), count: 4) }
        // Past the end of all RAM.
        #expect(throws: GuestMemoryError.self) { try m.read(UInt64.self, at: GuestAddress((5 << 20) - 4)) }
        #expect(!m.contains(GuestAddress(2 << 20), length: 1))
        #expect(m.contains(GuestAddress((5 << 20) - 8), length: 8))
    }

    @Test func rejectsRangesThatOverflow64Bits() throws {
        let m = try twoRegions()
        #expect(throws: GuestMemoryError.overflow(address: GuestAddress(UInt64.max - 1), length: 4)) {
            try m.check(GuestAddress(UInt64.max - 1), length: 4)
        }
        #expect(throws: GuestMemoryError.self) { try m.fill(at: GuestAddress(0x10), count: UInt64.max) }
        #expect(throws: GuestMemoryError.self) { try m.check(GuestAddress(0), length: 1 << 32) }
    }

    @Test func fillZeroesExactlyTheRange() throws {
        let m = try twoRegions()
        try m.write([UInt8](repeating: 0xAA, count: 16), at: GuestAddress(0x2000))
        try m.fill(at: GuestAddress(0x2004), count: 8)
        #expect(try m.readBytes(at: GuestAddress(0x2000), count: 16) == [0xAA, 0xAA, 0xAA, 0xAA] + [UInt8](repeating: 0, count: 8) + [0xAA, 0xAA, 0xAA, 0xAA])
    }

    @Test func layoutMustNotOverlapOrBeUnaligned() {
        #expect(throws: (any Error).self) { try GuestMemory(layout: [(GuestAddress(0), 8192), (GuestAddress(4096), 8192)]) }
        #expect(throws: (any Error).self) { try GuestMemory(layout: [(GuestAddress(0), 1000)]) }
        #expect(throws: (any Error).self) { try GuestMemory(layout: [(GuestAddress(UInt64.max - 4095), 8192)]) }
    }

    @Test func addressArithmeticIsChecked() {
        #expect(GuestAddress(UInt64.max).adding(1) == nil)
        #expect(GuestAddress(10).adding(5) == GuestAddress(15))
    }
}
