import AirlockOS
import Foundation
import GuestMemory
import Testing
@testable import LinuxBoot

/// Loading from a mapped file maps page-congruent segments into guest RAM
/// instead of copying them. Whatever path each byte takes, guest RAM must end
/// up exactly as the copying loader leaves it, and the file must never change.
@Suite struct MappedKernelTests {
    /// Text: file 0x1000, 16 MiB, 0x2800 bytes (two whole pages mapped, a half page copied) plus 0x1800 of bss
    /// (a half page written, a whole page discarded). Data: file 0x3800 to 17 MiB + 0x100, not page-congruent, so copied.
    static let image: [UInt8] = {
        var b = ELFImage.build(ELFImage.Header(entry: 0x100_0000), [
            .init(offset: 0x1000, address: 0x100_0000, fileSize: 0x2800, memorySize: 0x4000),
            .init(offset: 0x3800, address: 0x110_0100, fileSize: 0x300, memorySize: 0x400),
        ])
        b += [UInt8](repeating: 0xCC, count: 0x1000 - b.count)
        b += (0..<0x2800).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 5) }
        b += (0..<0x300).map { UInt8(truncatingIfNeeded: $0 &+ 0x40) }
        return b
    }()

    func stale() throws -> GuestMemory {
        let m = try testMemory()
        // RAM that already holds bytes: nothing may rely on it being fresh.
        try m.fill(at: GuestAddress(0x100_0000), count: 0x20_0000, value: 0xEE)
        return m
    }

    @Test func aMappedLoadLeavesRAMAsTheCopyingLoadDoesAndTheFileUnchanged() throws {
        let path = NSTemporaryDirectory() + "airlock-mapped-kernel-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try Data(Self.image).write(to: URL(fileURLWithPath: path))
        defer { unlink(path) }

        let copied = try stale()
        let kc = try KernelLoader.load(Self.image, path: path, into: copied)
        let mapped = try stale()
        let file = try MappedFile(path: path, role: "kernel")
        let km = try KernelLoader.load(file, into: mapped)
        #expect(km.entry == kc.entry && km.start == kc.start && km.end == kc.end)
        let span: UInt64 = 0x20_0000
        #expect(try mapped.readBytes(at: GuestAddress(0x100_0000), count: Int(span))
            == copied.readBytes(at: GuestAddress(0x100_0000), count: Int(span)))
        #expect(try mapped.readBytes(at: GuestAddress(0x100_0000), count: 0x2800) == Array(Self.image[0x1000..<0x3800]))
        #expect(try mapped.readBytes(at: GuestAddress(0x100_2800), count: 0x1800).allSatisfy { $0 == 0 })

        // The whole pages really are the file's (the zero-copy path was taken), copy-on-write.
        // (Read to the end: String(contentsOfFile:) stops after one read, about 4 KiB, of a /proc file.)
        let maps = String(decoding: try #require(FileHandle(forReadingAtPath: "/proc/self/maps")).readDataToEndOfFile(), as: UTF8.self)
        let lines = maps.split(separator: "\n").filter { $0.hasSuffix(path) }
        #expect(lines.count == 2, "the file is mapped twice, read-only for parsing and copy-on-write in guest RAM: \(lines)")
        #expect(lines.contains { $0.contains(" rw-p 00001000 ") }, "two whole pages from file offset 0x1000: \(lines)")
        try mapped.write([0, 0, 0, 0], at: GuestAddress(0x100_0000))
        #expect(try mapped.readBytes(at: GuestAddress(0x100_0000), count: 4) == [0, 0, 0, 0])
        #expect([UInt8](try Data(contentsOf: URL(fileURLWithPath: path))) == Self.image)
        withExtendedLifetime(file) {}
    }

    @Test func aFileThatIsNotAnImageIsRefusedByName() throws {
        #expect(throws: FileAccessError.self) { _ = try MappedFile(path: "/nonexistent/vmlinux", role: "kernel") }
        let directory = #expect(throws: FileAccessError.self) { _ = try MappedFile(path: "/tmp", role: "kernel") }
        #expect(directory?.description == "kernel '/tmp' is a directory: pass the file itself")
        let device = #expect(throws: FileAccessError.self) { _ = try MappedFile(path: "/dev/null", role: "kernel") }
        #expect(device?.description == "kernel '/dev/null' is not a regular file (a pipe or device): pass an image file")
        let empty = try MappedFile(path: "/proc/self/comm", role: "kernel")  // a regular file that stat says is empty
        #expect(empty.bytes.isEmpty)
        let m = try testMemory()
        #expect(throws: LinuxBootError.self) { _ = try KernelLoader.load(empty, into: m) }
    }
}
