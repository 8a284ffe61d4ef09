import AirlockOS
import Glibc
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

    /// Whole pages of zeros are handed back (MADV_REMOVE) rather than written:
    /// the result must still be exactly the range zeroed, dirty pages included.
    @Test func zeroFillOverWholePagesClearsDirtyPagesAndNothingElse() throws {
        let m = try twoRegions()
        try m.write([UInt8](repeating: 0xEE, count: 0x6000), at: GuestAddress(0x1000))
        try m.fill(at: GuestAddress(0x1010), count: 0x4000)  // a partial page, three whole pages, a partial page
        let after = try m.readBytes(at: GuestAddress(0x1000), count: 0x6000)
        #expect(after[0..<0x10].allSatisfy { $0 == 0xEE })
        #expect(after[0x10..<0x4010].allSatisfy { $0 == 0 })
        #expect(after[0x4010...].allSatisfy { $0 == 0xEE })
        // A non-zero fill over whole pages is written.
        try m.fill(at: GuestAddress(0x2000), count: 0x2000, value: 0x5A)
        #expect(try m.readBytes(at: GuestAddress(0x2000), count: 0x2000).allSatisfy { $0 == 0x5A })
    }

    /// A file mapped into RAM reads as the file, takes guest writes privately
    /// (the file keeps its bytes), and is refused unless page-aligned and inside RAM.
    @Test func aMappedFileReadsAsTheFileAndWritesNeverReachIt() throws {
        let path = "/tmp/airlock-guestmemory-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let content = (0..<0x3000).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        let fd = try OwnedFileDescriptor.open(path, flags: O_RDWR | O_CREAT | O_EXCL, mode: 0o600)
        defer { unlink(path) }
        try content.withUnsafeBytes { try fd.writeAll($0) }

        let m = try twoRegions()
        try m.write([UInt8](repeating: 0xEE, count: 0x4000), at: GuestAddress(0x10000))
        try m.mapFile(fd: fd.rawValue, fileOffset: 0x1000, at: GuestAddress(0x11000), length: 0x2000)
        #expect(try m.readBytes(at: GuestAddress(0x11000), count: 0x2000) == Array(content[0x1000..<0x3000]))
        #expect(try m.readBytes(at: GuestAddress(0x10000), count: 0x1000).allSatisfy { $0 == 0xEE })
        #expect(try m.readBytes(at: GuestAddress(0x13000), count: 0x1000).allSatisfy { $0 == 0xEE })

        try m.write([1, 2, 3, 4], at: GuestAddress(0x11000))
        #expect(try m.readBytes(at: GuestAddress(0x11000), count: 4) == [1, 2, 3, 4])
        var onDisk = [UInt8](repeating: 0, count: 0x3000)
        _ = try onDisk.withUnsafeMutableBytes { try fd.readExactly(into: $0, at: 0) }
        #expect(onDisk == content)
        // A zero fill over the mapped pages still zeroes them (written, as they are not shared memory).
        try m.fill(at: GuestAddress(0x11000), count: 0x2000)
        #expect(try m.readBytes(at: GuestAddress(0x11000), count: 0x2000).allSatisfy { $0 == 0 })

        #expect(throws: GuestMemoryError.notPageAligned(address: GuestAddress(0x11800), length: 0x1000, fileOffset: 0)) {
            try m.mapFile(fd: fd.rawValue, fileOffset: 0, at: GuestAddress(0x11800), length: 0x1000)
        }
        #expect(throws: GuestMemoryError.notPageAligned(address: GuestAddress(0x11000), length: 0x1000, fileOffset: 0x10)) {
            try m.mapFile(fd: fd.rawValue, fileOffset: 0x10, at: GuestAddress(0x11000), length: 0x1000)
        }
        // Across the end of the first region into the hole.
        #expect(throws: GuestMemoryError.outOfBounds(address: GuestAddress(0xFF000), length: 0x2000)) {
            try m.mapFile(fd: fd.rawValue, fileOffset: 0, at: GuestAddress(0xFF000), length: 0x2000)
        }
        // A descriptor that cannot be mapped leaves zeroed RAM, never a hole.
        #expect(throws: GuestMemoryError.self) {
            try m.mapFile(fd: -1, fileOffset: 0, at: GuestAddress(0x20000), length: 0x1000)
        }
        #expect(try m.readBytes(at: GuestAddress(0x20000), count: 0x1000).allSatisfy { $0 == 0 })
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
