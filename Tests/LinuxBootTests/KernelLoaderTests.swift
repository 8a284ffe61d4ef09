import GuestMemory
import Testing
@testable import LinuxBoot

/// Builds small ELF64 and bzImage files in memory, good and broken.
enum Images {
    static func le<T: FixedWidthInteger>(_ v: T) -> [UInt8] { (0..<MemoryLayout<T>.size).map { UInt8(truncatingIfNeeded: v >> T(8 * $0)) } }

    struct Phdr { var type: UInt32 = 1; var offset: UInt64; var paddr: UInt64; var filesz: UInt64; var memsz: UInt64 }

    /// An ELF header, `phdrs` at offset 64, then `payload` bytes.
    static func elf(entry: UInt64, phdrs: [Phdr], payload: [UInt8], machine: UInt16 = 62, elfClass: UInt8 = 2,
                    phentsize: UInt16 = 56, phnum: UInt16? = nil) -> [UInt8] {
        var h: [UInt8] = [0x7F, 0x45, 0x4C, 0x46, elfClass, 1, 1, 0] + [UInt8](repeating: 0, count: 8)
        h += le(UInt16(2)) + le(machine) + le(UInt32(1)) + le(entry) + le(UInt64(64)) + le(UInt64(0))
        h += le(UInt32(0)) + le(UInt16(64)) + le(phentsize) + le(phnum ?? UInt16(phdrs.count)) + le(UInt16(0)) + le(UInt16(0)) + le(UInt16(0))
        precondition(h.count == 64)
        for p in phdrs {
            h += le(p.type) + le(UInt32(7)) + le(p.offset) + le(p.paddr) + le(p.paddr) + le(p.filesz) + le(p.memsz) + le(UInt64(0x1000))
        }
        return h + payload
    }

    /// Two segments: 0x100 code bytes at 16 MiB, and 0x40 data bytes + 0x1000 bss at 17 MiB.
    static var goodELF: [UInt8] {
        let dataStart = 64 + 2 * 56
        let code = [UInt8](repeating: 0x90, count: 0x100)
        let data = [UInt8](repeating: 0xAB, count: 0x40)
        return elf(entry: 0x100_0000,
                   phdrs: [Phdr(offset: UInt64(dataStart), paddr: 0x100_0000, filesz: 0x100, memsz: 0x100),
                           Phdr(offset: UInt64(dataStart + 0x100), paddr: 0x110_0000, filesz: 0x40, memsz: 0x1040)],
                   payload: code + data)
    }

    /// A bzImage with `setupSects` setup sectors and a protected-mode payload.
    static func bzImage(version: UInt16 = 0x020F, xloadflags: UInt16 = 1, setupSects: UInt8 = 1, payload: Int = 4096,
                        initSize: UInt32 = 0x10_0000) -> [UInt8] {
        var f = [UInt8](repeating: 0, count: (Int(setupSects) + 1) * 512)
        f[0x1F1] = setupSects
        f[0x1FE] = 0x55; f[0x1FF] = 0xAA
        f[0x200] = 0xEB; f[0x201] = 0x6A  // jump; header ends at 0x202 + 0x6A = 0x26C
        f.replaceSubrange(0x202..<0x206, with: Array("HdrS".utf8))
        f.replaceSubrange(0x206..<0x208, with: le(version))
        f.replaceSubrange(0x22C..<0x230, with: le(UInt32(0x7FFF_FFFF)))
        f.replaceSubrange(0x236..<0x238, with: le(xloadflags))
        f.replaceSubrange(0x260..<0x264, with: le(initSize))
        return f + [UInt8](repeating: 0xCC, count: payload)
    }
}

@Suite struct KernelLoaderTests {
    func memory() throws -> GuestMemory { try GuestMemory(layout: [(GuestAddress(0), 64 << 20)]) }

    @Test func loadsAnELFWithItsBss() throws {
        let m = try memory()
        try m.fill(at: GuestAddress(0x110_0000), count: 0x2000, value: 0xEE)  // stale bytes where the bss goes
        let k = try KernelLoader.load(Images.goodELF, path: "vmlinux", into: m)
        #expect(k.format == .elf && k.entry == GuestAddress(0x100_0000))
        #expect(k.start == GuestAddress(0x100_0000) && k.end == GuestAddress(0x110_1040))
        #expect(try m.readBytes(at: GuestAddress(0x100_0000), count: 4) == [0x90, 0x90, 0x90, 0x90])
        #expect(try m.readBytes(at: GuestAddress(0x110_003E), count: 4) == [0xAB, 0xAB, 0, 0])
        #expect(try m.readBytes(at: GuestAddress(0x110_103F), count: 2) == [0, 0xEE])
    }

    @Test func everyTruncationIsReportedNotCrashed() throws {
        let good = Images.goodELF
        for length in [4, 20, 63, 64, 100, 64 + 56, 64 + 2 * 56 - 1, 64 + 2 * 56 + 10, good.count - 1] {
            let m = try memory()
            #expect(throws: LinuxBootError.self) { try KernelLoader.load(Array(good.prefix(length)), path: "cut", into: m) }
        }
    }

    func rejects(_ image: [UInt8], _ check: (LinuxBootError) -> Bool = { _ in true }) throws {
        let m = try memory()
        do {
            _ = try KernelLoader.load(image, path: "/k/vmlinux", into: m)
            Issue.record("loaded a bad image")
        } catch {
            #expect(check(error), "unexpected error: \(error)")
            #expect(error.description.contains("/k/vmlinux"))
        }
    }

    @Test func hostileProgramHeadersAreRejected() throws {
        typealias P = Images.Phdr
        // p_offset + p_filesz overflows 64 bits.
        try rejects(Images.elf(entry: 0x100_0000, phdrs: [P(offset: UInt64.max - 8, paddr: 0x100_0000, filesz: 0x100, memsz: 0x100)], payload: []))
        // p_paddr beyond RAM.
        try rejects(Images.elf(entry: 0x1_0000_0000, phdrs: [P(offset: 0, paddr: 0x1_0000_0000, filesz: 0x10, memsz: 0x10)], payload: [])) {
            if case .segmentOutsideMemory = $0 { return true }; return false
        }
        // p_paddr + p_memsz overflows.
        try rejects(Images.elf(entry: 0x100_0000, phdrs: [P(offset: 0, paddr: UInt64.max - 0x10, filesz: 0x10, memsz: 0x100)], payload: []))
        // p_memsz reaching past the end of RAM.
        try rejects(Images.elf(entry: 0x100_0000, phdrs: [P(offset: 0, paddr: 0x100_0000, filesz: 0x10, memsz: 1 << 40)], payload: []))
        // p_filesz > p_memsz.
        try rejects(Images.elf(entry: 0x100_0000, phdrs: [P(offset: 0, paddr: 0x100_0000, filesz: 0x20, memsz: 0x10)], payload: [])) {
            if case .malformed = $0 { return true }; return false
        }
        // A huge phnum and a wrong phentsize.
        try rejects(Images.elf(entry: 0x100_0000, phdrs: [], payload: [], phnum: 0xFFFF))
        try rejects(Images.elf(entry: 0x100_0000, phdrs: [P(offset: 0, paddr: 0x100_0000, filesz: 0x10, memsz: 0x10)], payload: [], phentsize: 32))
        // No PT_LOAD at all.
        try rejects(Images.elf(entry: 0x100_0000, phdrs: [P(type: 4, offset: 0, paddr: 0x100_0000, filesz: 0x10, memsz: 0x10)], payload: []))
        // Entry outside every segment.
        try rejects(Images.elf(entry: 0x300_0000, phdrs: [P(offset: 0, paddr: 0x100_0000, filesz: 0x10, memsz: 0x10)], payload: []))
    }

    @Test func nonX86ELFsAreRejected() throws {
        let p = [Images.Phdr(offset: 0, paddr: 0x100_0000, filesz: 0x10, memsz: 0x10)]
        try rejects(Images.elf(entry: 0x100_0000, phdrs: p, payload: [], machine: 183)) {  // aarch64
            if case .unsupportedELF = $0 { return true }; return false
        }
        try rejects(Images.elf(entry: 0x100_0000, phdrs: p, payload: [], elfClass: 1)) {
            if case .unsupportedELF = $0 { return true }; return false
        }
    }

    @Test func neitherELFNorBzImageIsNamedAsSuch() throws {
        try rejects(Array("#!/bin/sh\necho hi\n".utf8)) { if case .unknownFormat = $0 { return true }; return false }
        try rejects([]) { if case .unknownFormat = $0 { return true }; return false }
    }

    @Test func loadsABzImageAtOneMiBWithItsHeader() throws {
        let m = try memory()
        let image = Images.bzImage(setupSects: 2)
        let k = try KernelLoader.load(image, path: "bzImage", into: m)
        #expect(k.format == .bzImage)
        #expect(k.start == GuestAddress(0x10_0000) && k.entry == GuestAddress(0x10_0200))
        #expect(k.end == GuestAddress(0x20_0000))  // init_size (1 MiB) covers more than the 4 KiB payload
        #expect(try m.readBytes(at: GuestAddress(0x10_0000), count: 2) == [0xCC, 0xCC])
        #expect(k.setupHeader?.count == 0x26C - 0x1F1)
        let params = BootParams(kernel: k).bytes
        #expect(Array(params[0x202..<0x206]) == Array("HdrS".utf8))
        #expect(params[0x1F1] == 2 && params[0x210] == 0xFF && params[0x211] & 0x81 == 0x81)
    }

    @Test func setupSectsZeroMeansFour() throws {
        let m = try memory()
        var image = Images.bzImage(setupSects: 4)
        image[0x1F1] = 0
        let k = try KernelLoader.load(image, path: "bzImage", into: m)
        #expect(k.end.raw >= 0x10_1000)
    }

    @Test func badBzImagesAreRejected() throws {
        try rejects(Images.bzImage(version: 0x020B)) { if case .unsupportedBzImage = $0 { return true }; return false }
        try rejects(Images.bzImage(xloadflags: 0)) { if case .unsupportedBzImage = $0 { return true }; return false }
        var noFlag = Images.bzImage(); noFlag[0x1FE] = 0
        try rejects(noFlag)
        var pastEnd = Images.bzImage(payload: 0); pastEnd[0x1F1] = 200
        try rejects(pastEnd) { if case .truncated = $0 { return true }; return false }
        try rejects(Array(Images.bzImage().prefix(0x230)))
        try rejects(Images.bzImage(initSize: 0xFFFF_FFFF)) { if case .segmentOutsideMemory = $0 { return true }; return false }
    }
}
