import GuestMemory
import SeededRandom
import Testing
@testable import LinuxBoot

@Suite struct BzImageLoaderTests {
    let path = "/k/bzImage"

    func problem(_ image: [UInt8]) throws -> BzImageProblem? {
        guard case let .invalidBzImage(p, problem)? = try loadError(image, path: path) else { return nil }
        #expect(p == path)
        return problem
    }

    @Test func loadsTheProtectedModeCodeAtOneMiB() throws {
        let m = try testMemory()
        let image = BzImage.build()
        let k = try KernelLoader.load(image, path: path, into: m)
        #expect(k.format == .bzImage)
        #expect(k.start == GuestAddress(0x10_0000))
        #expect(k.entry == GuestAddress(0x10_0200))  // 64-bit entry: load address + 0x200
        // Relocatable, loaded below pref_address: it moves to 16 MiB and needs init_size from there.
        #expect(k.end == GuestAddress(0x100_0000 + 0x40_0000))
        #expect(try m.readBytes(at: GuestAddress(0x10_0000), count: 0x2000) == BzImage.payload(0x2000))
        #expect(k.setupHeader == Array(image[0x1F1..<0x26C]))
        #expect(k.initrdAddressMax == 0x7FFF_FFFF && k.maxCommandLineLength == 0x7FF && k.bootProtocolVersion == 0x020F)
    }

    @Test func theDecompressionAreaFollowsTheBootProtocol() throws {
        // Relocatable, pref_address below the load address: load address rounded up to kernel_alignment.
        var k = try KernelLoader.load(BzImage.with { $0.prefAddress = 0; $0.kernelAlignment = 0x40_0000 }, path: path, into: testMemory())
        #expect(k.end == GuestAddress(0x40_0000 + 0x40_0000))
        // Not relocatable: it runs at pref_address whatever the load address.
        k = try KernelLoader.load(BzImage.with { $0.relocatable = 0; $0.prefAddress = 0x200_0000; $0.kernelAlignment = 3 },
                                  path: path, into: testMemory())
        #expect(k.end == GuestAddress(0x200_0000 + 0x40_0000))
        // A file longer than its decompression area: the file's end counts.
        k = try KernelLoader.load(BzImage.with { $0.prefAddress = 0x10_0000; $0.kernelAlignment = 0x10_0000; $0.initSize = 0x1000 },
                                  path: path, into: testMemory())
        #expect(k.end == GuestAddress(0x10_0000 + 0x2000))
    }

    @Test func setupSectsZeroMeansFour() throws {
        let m = try testMemory()
        let image = BzImage.with { $0.setupSects = 0 }
        #expect(image.count == 5 * 512 + 0x2000)
        _ = try KernelLoader.load(image, path: path, into: m)
        #expect(try m.readBytes(at: GuestAddress(0x10_0000), count: 16) == Array(BzImage.payload(16)))
    }

    @Test func headersThatCannotBootAreRejected() throws {
        #expect(try problem(BzImage.with { $0.bootFlag = 0 }) == .badBootFlag(0))
        #expect(try problem(BzImage.with { $0.version = 0x020B }) == .protocolTooOld(version: 0x020B))
        #expect(try problem(BzImage.with { $0.version = 0x0105 }) == .protocolTooOld(version: 0x0105))
        #expect(try problem(BzImage.with { $0.xloadflags = 0x02 }) == .no64BitEntry)
        #expect(try problem(BzImage.with { $0.loadFlags = 0 }) == .notLoadedHigh)
        #expect(try problem(BzImage.with { $0.headerLength = 0x20 }) == .setupHeaderTooShort(end: 0x222))
        #expect(try problem(BzImage.with { $0.kernelAlignment = 0x30_0000 }) == .badKernelAlignment(0x30_0000))
        #expect(try problem(BzImage.with { $0.kernelAlignment = 0 }) == .badKernelAlignment(0))
        // 2.12 is the oldest accepted, and exactly the minimum loads.
        _ = try KernelLoader.load(BzImage.with { $0.version = 0x020C }, path: path, into: testMemory())
    }

    @Test func messagesSayWhatIsWrongAndWhatToDo() throws {
        let old = try loadError(BzImage.with { $0.version = 0x020B }, path: path)
        #expect(old?.description == "kernel '/k/bzImage' is a bzImage with boot protocol 2.11, older than 2.12, which the "
            + "64-bit entry needs: use a Linux 3.8 or newer kernel")
        let no64 = try loadError(BzImage.with { $0.xloadflags = 0 }, path: path)
        #expect(no64?.description.contains("XLF_KERNEL_64") == true)
    }

    @Test func aFileWithoutHdrSIsNotABzImage() throws {
        var image = BzImage.build()
        image[0x202] = UInt8(ascii: "X")
        #expect(try loadError(image, path: path) == .unrecognizedKernel(path: path, firstBytes: Array(image.prefix(8))))
    }

    @Test func setupSectsPointingPastTheEndIsTruncation() throws {
        var image = BzImage.with { $0.payloadSize = 0 }
        image[0x1F1] = 200
        #expect(try loadError(image, path: path) == .truncated(
            path: path, what: "the protected-mode kernel after 200 setup sectors", start: 201 * 512,
            end: 201 * 512 + 0x201, fileSize: UInt64(image.count)))
    }

    @Test func syssizeClaimingMoreThanTheFileIsTruncation() throws {
        let image = BzImage.with { $0.syssize = 0x1000 }  // 64 KiB claimed, 8 KiB present
        #expect(try loadError(image, path: path) == .truncated(
            path: path, what: "the protected-mode kernel after 2 setup sectors", start: 0x600, end: 0x600 + 0x10000,
            fileSize: UInt64(image.count)))
    }

    /// Cut the good image at every length.
    @Test func everyTruncationIsReported() throws {
        let good = BzImage.build()
        let m = try testMemory()
        for length in 0..<good.count {
            let cut = Array(good.prefix(length))
            let n = UInt64(length)
            let expected: LinuxBootError =
                switch n {
                case ..<0x206: .unrecognizedKernel(path: "cut", firstBytes: Array(cut.prefix(8)))
                case ..<0x208: .truncated(path: "cut", what: "the boot protocol version", start: 0x206, end: 0x208, fileSize: n)
                case ..<0x26C: .truncated(path: "cut", what: "the setup header", start: 0x1F1, end: 0x26C, fileSize: n)
                default: .truncated(path: "cut", what: "the protected-mode kernel after 2 setup sectors",
                                    start: 0x600, end: UInt64(good.count), fileSize: n)
                }
            #expect(throws: expected) { try KernelLoader.load(cut, path: "cut", into: m) }
        }
        #expect(try m.readBytes(at: GuestAddress(0x10_0000), count: 16) == [UInt8](repeating: 0, count: 16))
    }

    @Test func kernelsThatDoNotFitInRAMAreRejected() throws {
        // init_size far beyond 64 MiB.
        #expect(try loadError(BzImage.with { $0.initSize = 0xFFFF_FFFF }, path: path)
            == .bzImageOutsideMemory(path: path, address: 0x10_0000, size: 0x100_0000 - 0x10_0000 + 0xFFFF_FFFF, ramEnd: 64 << 20))
        // Small RAM: 2 MiB cannot hold 1 MiB + 2 MiB of decompression area.
        let small = try testMemory(2 << 20)
        let e = try loadError(BzImage.with { $0.prefAddress = 0x10_0000; $0.kernelAlignment = 0x10_0000; $0.initSize = 0x20_0000 },
                              path: path, memory: small)
        #expect(e == .bzImageOutsideMemory(path: path, address: 0x10_0000, size: 0x20_0000, ramEnd: 2 << 20))
        #expect(e?.description.contains("--memory") == true)
        // A non-relocatable kernel that wants to run below the load address (over the zero page).
        #expect(try problem(BzImage.with { $0.relocatable = 0; $0.prefAddress = 0x1_0000 }) == .runsBelowLoadAddress(0x1_0000))
    }

    @Test func hostileAddressesOverflowCleanly() throws {
        #expect(try loadError(BzImage.with { $0.prefAddress = .max - 5 }, path: path)
            == .rangeOverflows(path: path, what: "pref_address", offset: .max - 5, length: 0x1F_FFFF))
        #expect(try loadError(BzImage.with { $0.relocatable = 0; $0.prefAddress = .max - 0x10; $0.initSize = 0x100 }, path: path)
            == .rangeOverflows(path: path, what: "the decompression area", offset: .max - 0x10, length: 0x100))
    }

    /// A header-length byte of 0xFF claims a header up to 0x301, over boot_params' e820 table;
    /// only the part boot_params reserves for the header is kept.
    @Test func anOverlongSetupHeaderIsClamped() throws {
        var image = BzImage.with { $0.headerLength = 0xFF }
        image.replaceSubrange(0x2D0..<0x301, with: [UInt8](repeating: 0xEE, count: 0x31))
        let k = try KernelLoader.load(image, path: path, into: testMemory())
        #expect(k.setupHeader?.count == 0x290 - 0x1F1)
        #expect(BootParams(kernel: k).bytes[0x290...].allSatisfy { $0 == 0 })
    }

    @Test func randomlyCorruptedSetupHeadersNeverCrash() throws {
        let m = try testMemory()
        let good = BzImage.build()
        var rng = SplitMix64(seed: 0xB2)
        let extremes: [UInt8] = [0, 0xFF, 0x7F, 0x80, 0x01]
        var loaded = 0
        for _ in 0..<3000 {
            var image = good
            for _ in 0..<Int.random(in: 1...4, using: &rng) {
                let at = Int.random(in: 0x1F1..<0x270, using: &rng)
                image[at] = Bool.random(using: &rng) ? extremes.randomElement(using: &rng)! : UInt8.random(in: 0...255, using: &rng)
            }
            if Int.random(in: 0..<8, using: &rng) == 0 { image = Array(image.prefix(Int.random(in: 0...image.count, using: &rng))) }
            do {
                let k = try KernelLoader.load(image, path: "fuzz", into: m)
                loaded += 1
                #expect(m.contains(k.start, length: k.end.raw - k.start.raw))
                #expect(k.entry.raw == k.start.raw + 0x200 && k.setupHeader!.count <= 0x290 - 0x1F1)
                _ = BootParams(kernel: k)
            } catch {
                #expect(error.description.contains("'fuzz'"))
            }
        }
        #expect(loaded > 0)
    }
}
