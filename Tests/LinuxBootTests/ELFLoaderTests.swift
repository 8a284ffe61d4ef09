import GuestMemory
import SeededRandom
import Testing
@testable import LinuxBoot

@Suite struct ELFLoaderTests {
    typealias P = ELFImage.ProgramHeader

    @Test func loadsSegmentsAtTheirPhysicalAddressesAndZeroesTheBss() throws {
        let m = try testMemory()
        // Stale bytes where the bss goes: the loader must clear them, not rely on fresh RAM.
        try m.fill(at: GuestAddress(ELFImage.dataAddress), count: 0x2000, value: 0xEE)
        let image = ELFImage.good
        let k = try KernelLoader.load(image, path: "vmlinux", into: m)
        #expect(k.format == .elf && k.setupHeader == nil)
        #expect(k.entry == GuestAddress(0x100_0010))
        #expect(k.start == GuestAddress(0x100_0000))
        #expect(k.end == GuestAddress(0x110_1040))
        let text = try m.readBytes(at: GuestAddress(ELFImage.textAddress), count: ELFImage.textSize)
        #expect(text == Array(image[ELFImage.textOffset..<(ELFImage.textOffset + ELFImage.textSize)]))
        let data = try m.readBytes(at: GuestAddress(ELFImage.dataAddress), count: ELFImage.dataSize + ELFImage.bssSize + 1)
        #expect(data.prefix(ELFImage.dataSize).allSatisfy { $0 == 0xAB })
        #expect(data.dropFirst(ELFImage.dataSize).prefix(ELFImage.bssSize).allSatisfy { $0 == 0 })
        #expect(data.last == 0xEE)  // the byte after the bss is not the loader's
        #expect(k.initrdAddressMax == 0xFFFF_FFFF && k.maxCommandLineLength == nil && k.bootProtocolVersion == nil)
    }

    /// Cut the good image at every length: each cut names the structure it broke, with exact byte ranges.
    @Test func everyTruncationIsReportedPrecisely() throws {
        let good = ELFImage.good
        let m = try testMemory()
        let tableEnd = UInt64(ELFImage.textOffset)
        let textEnd = UInt64(ELFImage.dataOffset)
        let dataEnd = UInt64(good.count)
        for length in 0..<good.count {
            let cut = Array(good.prefix(length))
            let n = UInt64(length)
            let expected: LinuxBootError =
                switch n {
                case ..<4: .unrecognizedKernel(path: "cut", firstBytes: Array(cut.prefix(8)))
                case ..<64: .truncated(path: "cut", what: "the ELF header", start: 0, end: 64, fileSize: n)
                case ..<tableEnd:
                    .truncated(path: "cut", what: "the program header table (3 entries)", start: 64, end: tableEnd, fileSize: n)
                case ..<textEnd: .truncated(path: "cut", what: "segment 0", start: tableEnd, end: textEnd, fileSize: n)
                default: .truncated(path: "cut", what: "segment 2", start: textEnd, end: dataEnd, fileSize: n)
                }
            #expect(throws: expected) { try KernelLoader.load(cut, path: "cut", into: m) }
        }
        // Nothing was written by any of the failed loads.
        #expect(try m.readBytes(at: GuestAddress(ELFImage.textAddress), count: 16) == [UInt8](repeating: 0, count: 16))
        #expect(try KernelLoader.load(good, path: "whole", into: m).format == .elf)
    }

    @Test func truncationMessageNamesTheRangeAndTheFileSize() throws {
        let error = try loadError(Array(ELFImage.good.prefix(100)), path: "/x/vmlinux")
        #expect(error?.description == "kernel '/x/vmlinux' is truncated: the program header table (3 entries) needs bytes "
            + "0x40-0xe8 but the file has 0x64 bytes: the file is incomplete or damaged; copy or build it again")
    }

    @Test func fileRangesThatOverflowOrRunPastTheEndAreRejected() throws {
        let path = "/k/vmlinux"
        #expect(try loadError(ELFImage.one(P(offset: .max - 8, address: 0x100_0000, fileSize: 0x100, memorySize: 0x100)))
            == .rangeOverflows(path: path, what: "segment 0", offset: .max - 8, length: 0x100))
        let pastEnd = ELFImage.one(P(offset: 0x10000, address: 0x100_0000, fileSize: 0x10, memorySize: 0x10))
        #expect(try loadError(pastEnd)
            == .truncated(path: path, what: "segment 0", start: 0x10000, end: 0x10010, fileSize: UInt64(pastEnd.count)))
        // A program header table far away, and one whose offset overflows.
        let far = ELFImage.one(P(offset: 0, address: 0x100_0000, fileSize: 0x10, memorySize: 0x10)) { $0.programHeaderOffset = 1 << 40 }
        #expect(try loadError(far) == .truncated(path: path, what: "the program header table (1 entries)", start: 1 << 40,
                                                  end: (1 << 40) + 56, fileSize: UInt64(far.count)))
        let wrap = ELFImage.one(P(offset: 0, address: 0x100_0000, fileSize: 0x10, memorySize: 0x10)) { $0.programHeaderOffset = .max - 10 }
        #expect(try loadError(wrap) == .rangeOverflows(path: path, what: "the program header table (1 entries)", offset: .max - 10, length: 56))
    }

    @Test func physicalRangesOutsideRAMAreRejected() throws {
        let path = "/k/vmlinux"
        let ramEnd: UInt64 = 64 << 20
        // p_paddr beyond RAM.
        #expect(try loadError(ELFImage.one(P(offset: 0, address: 1 << 32, fileSize: 0x10, memorySize: 0x10), entry: 1 << 32))
            == .segmentOutsideMemory(path: path, segment: 0, address: 1 << 32, size: 0x10, ramEnd: ramEnd))
        // p_paddr + p_memsz overflowing 64 bits.
        #expect(try loadError(ELFImage.one(P(offset: 0, address: .max - 0x10, fileSize: 0x10, memorySize: 0x100)))
            == .rangeOverflows(path: path, what: "segment 0's physical range", offset: .max - 0x10, length: 0x100))
        // A bss reaching far past the end of RAM.
        #expect(try loadError(ELFImage.one(P(offset: 0, address: 0x100_0000, fileSize: 0x10, memorySize: 1 << 40)))
            == .segmentOutsideMemory(path: path, segment: 0, address: 0x100_0000, size: 1 << 40, ramEnd: ramEnd))
        // Straddling the end of RAM by one byte; and ending exactly at it, which is fine.
        #expect(try loadError(ELFImage.one(P(offset: 0, address: ramEnd - 0x10, fileSize: 0x10, memorySize: 0x11), entry: ramEnd - 0x10))
            == .segmentOutsideMemory(path: path, segment: 0, address: ramEnd - 0x10, size: 0x11, ramEnd: ramEnd))
        let k = try KernelLoader.load(ELFImage.one(P(offset: 0, address: ramEnd - 0x10, fileSize: 0x10, memorySize: 0x10), entry: ramEnd - 1),
                                      path: path, into: testMemory())
        #expect(k.end == GuestAddress(ramEnd))
    }

    @Test func aSegmentInAHoleBetweenRegionsIsRejected() throws {
        let m = try GuestMemory(layout: [(GuestAddress(0), 1 << 20), (GuestAddress(4 << 20), 1 << 20)])
        #expect(try loadError(ELFImage.one(P(offset: 0, address: 2 << 20, fileSize: 0x10, memorySize: 0x10), entry: 2 << 20), memory: m)
            == .segmentOutsideMemory(path: "/k/vmlinux", segment: 0, address: 2 << 20, size: 0x10, ramEnd: 5 << 20))
        // Crossing from one region into the hole.
        #expect(try loadError(ELFImage.one(P(offset: 0, address: (5 << 20) - 8, fileSize: 0x10, memorySize: 0x10), entry: (5 << 20) - 8),
                              memory: m)
            == .segmentOutsideMemory(path: "/k/vmlinux", segment: 0, address: (5 << 20) - 8, size: 0x10, ramEnd: 5 << 20))
    }

    @Test func inconsistentHeadersAreRejected() throws {
        func problem(_ image: [UInt8]) throws -> ELFProblem? {
            guard case let .invalidELF(_, p)? = try loadError(image) else { return nil }
            return p
        }
        let ok = P(offset: 0, address: 0x100_0000, fileSize: 0x10, memorySize: 0x10)
        #expect(try problem(ELFImage.one(P(offset: 0, address: 0x100_0000, fileSize: 0x20, memorySize: 0x10)))
            == .fileSizeExceedsMemorySize(segment: 0, fileSize: 0x20, memorySize: 0x10))
        #expect(try problem(ELFImage.one(P(offset: 0, address: 0x100_0000, fileSize: 0x11, memorySize: 0x10)))
            == .fileSizeExceedsMemorySize(segment: 0, fileSize: 0x11, memorySize: 0x10))  // off by one byte
        #expect(try problem(ELFImage.one(ok) { $0.programHeaderCount = 0xFFFF }) == .programHeaderCount(0xFFFF))
        #expect(try problem(ELFImage.one(ok) { $0.programHeaderCount = 65 }) == .programHeaderCount(65))
        #expect(try problem(ELFImage.one(ok) { $0.programHeaderCount = 0 }) == .programHeaderCount(0))
        #expect(try problem(ELFImage.one(ok) { $0.programHeaderSize = 32 }) == .programHeaderSize(32))
        #expect(try problem(ELFImage.one(P(type: 4, offset: 0, address: 0x100_0000, fileSize: 0x10, memorySize: 0x10)))
            == .noLoadableSegment)
        // A PT_LOAD with nothing in memory does not count as loadable.
        #expect(try problem(ELFImage.one(P(offset: 0, address: 0x100_0000, fileSize: 0, memorySize: 0))) == .noLoadableSegment)
        // The entry must be inside a loaded segment: one past its end is not.
        #expect(try problem(ELFImage.one(ok, entry: 0x300_0000)) == .entryOutsideSegments(entry: 0x300_0000))
        #expect(try problem(ELFImage.one(ok, entry: 0x100_0010)) == .entryOutsideSegments(entry: 0x100_0010))
        #expect(try problem(ELFImage.one(ok, entry: 0xFF_FFFF)) == .entryOutsideSegments(entry: 0xFF_FFFF))
    }

    @Test func nonX86_64ELFsAreRejected() throws {
        func problem(_ edit: (inout ELFImage.Header) -> Void) throws -> ELFProblem? {
            guard case let .invalidELF(_, p)? = try loadError(ELFImage.one(P(offset: 0, address: 0x100_0000, fileSize: 0x10, memorySize: 0x10),
                                                                         edit: edit)) else { return nil }
            return p
        }
        #expect(try problem { $0.machine = 183 } == .notX86_64(machine: 183))  // aarch64
        #expect(try problem { $0.elfClass = 1 } == .notELF64(elfClass: 1))
        #expect(try problem { $0.encoding = 2 } == .notLittleEndian(encoding: 2))
        #expect(try problem { $0.type = 3 } == .notExecutable(type: 3))  // ET_DYN
        #expect(try problem { $0.type = 1 } == .notExecutable(type: 1))  // ET_REL: a module
        let e = try loadError(ELFImage.one(P(offset: 0, address: 0x100_0000, fileSize: 0x10, memorySize: 0x10)) { $0.machine = 40 })
        #expect(e?.description.contains("machine 40, not x86-64 (62)") == true)
    }

    /// Validation finishes before the first byte is written: a bad later segment leaves RAM as it was.
    @Test func aRejectedImageLeavesGuestMemoryUntouched() throws {
        let m = try testMemory()
        let image = ELFImage.build(ELFImage.Header(entry: 0x100_0000), [
            P(offset: 0, address: 0x100_0000, fileSize: 0x40, memorySize: 0x1000),
            P(offset: 0, address: 0x400_0000, fileSize: 0x10, memorySize: 0x10),  // just past RAM
        ])
        #expect(try loadError(image, memory: m)
            == .segmentOutsideMemory(path: "/k/vmlinux", segment: 1, address: 0x400_0000, size: 0x10, ramEnd: 64 << 20))
        #expect(try m.readBytes(at: GuestAddress(0x100_0000), count: 0x1000).allSatisfy { $0 == 0 })
    }

    @Test func garbageThatIsNeitherFormatIsNamedAsSuch() throws {
        #expect(try loadError(Array("#!/bin/sh\necho hi\n".utf8), path: "/x/k")
            == .unrecognizedKernel(path: "/x/k", firstBytes: Array("#!/bin/s".utf8)))
        let e = try loadError([], path: "/x/empty")
        #expect(e == .unrecognizedKernel(path: "/x/empty", firstBytes: []))
        #expect(e?.description.contains("empty") == true)
        let gz = try loadError([0x1F, 0x8B, 0x08, 0x00], path: "/x/vmlinuz.gz")
        #expect(gz?.description == "kernel '/x/vmlinuz.gz' is neither an ELF vmlinux nor a bzImage (first bytes 1f 8b 08 00): "
            + "pass an x86-64 vmlinux or bzImage")
    }

    /// Random corruption of the headers of a good image: every outcome is a load or a
    /// LinuxBootError, never a crash, and a load stays inside RAM with its entry inside it.
    @Test func randomlyCorruptedHeadersNeverCrash() throws {
        let m = try testMemory()
        let good = ELFImage.good
        var rng = SplitMix64(seed: 0xE1F)
        let extremes: [UInt8] = [0, 0xFF, 0x7F, 0x80, 0x01]
        var loaded = 0
        for _ in 0..<3000 {
            var image = good
            for _ in 0..<Int.random(in: 1...4, using: &rng) {
                let at = Int.random(in: 0..<ELFImage.textOffset, using: &rng)  // ELF header and program headers
                image[at] = Bool.random(using: &rng) ? extremes.randomElement(using: &rng)! : UInt8.random(in: 0...255, using: &rng)
            }
            if Bool.random(using: &rng) { image = Array(image.prefix(Int.random(in: 0...image.count, using: &rng))) }
            do {
                let k = try KernelLoader.load(image, path: "fuzz", into: m)
                loaded += 1
                #expect(m.contains(k.start, length: k.end.raw - k.start.raw))
                #expect(k.entry >= k.start && k.entry < k.end)
            } catch {
                #expect(error.description.contains("'fuzz'"))
            }
        }
        #expect(loaded > 0)  // some corruptions are harmless (e_ident padding, p_flags, p_vaddr)
    }
}

