import GuestMemory
import Testing
@testable import LinuxBoot

@Suite struct E820MapTests {
    @Test func oneRegionGetsLowRAMTheBIOSHoleAndHighRAM() throws {
        let map = E820Entry.e820Map(memory: try testMemory())
        #expect(map == [E820Entry(address: 0, size: 0x9FC00, type: .ram),
                        E820Entry(address: 0x9FC00, size: 0x100000 - 0x9FC00, type: .reserved),
                        E820Entry(address: 0x100000, size: (64 << 20) - 0x100000, type: .ram)])
    }

    @Test func furtherRegionsAreRAM() throws {
        let m = try GuestMemory(layout: [(GuestAddress(0), 64 << 20), (GuestAddress(1 << 32), 2 << 20)])
        #expect(E820Entry.e820Map(memory: m) == [
            E820Entry(address: 0, size: 0x9FC00, type: .ram),
            E820Entry(address: 0x9FC00, size: 0x60400, type: .reserved),
            E820Entry(address: 0x100000, size: (64 << 20) - 0x100000, type: .ram),
            E820Entry(address: 1 << 32, size: 2 << 20, type: .ram),
        ])
        #expect(E820Entry.map(for: m) == E820Entry.e820Map(memory: m))
    }

    /// RAM that ends inside the legacy hole is not reported as RAM there.
    @Test func smallRAMDoesNotClaimTheBIOSArea() throws {
        let m = try GuestMemory(layout: [(GuestAddress(0), 0xA0000)])  // 640 KiB
        #expect(E820Entry.e820Map(memory: m) == [E820Entry(address: 0, size: 0x9FC00, type: .ram),
                                                 E820Entry(address: 0x9FC00, size: 0x60400, type: .reserved)])
        let tiny = try GuestMemory(layout: [(GuestAddress(0), 0x10000)])
        #expect(E820Entry.e820Map(memory: tiny).first == E820Entry(address: 0, size: 0x10000, type: .ram))
    }
}

@Suite struct InitrdPlacerTests {
    static func vmlinux(end: UInt64 = 0x200_0000) -> LoadedKernel {
        LoadedKernel(format: .elf, entry: GuestAddress(0x100_0000), start: GuestAddress(0x100_0000), end: GuestAddress(end), setupHeader: nil)
    }

    static func bzImage(initrdAddrMax: UInt32) -> LoadedKernel {
        var header = [UInt8](repeating: 0, count: 0x26C - 0x1F1)
        header.replaceSubrange((0x22C - 0x1F1)..<(0x230 - 0x1F1), with: le(initrdAddrMax))
        return LoadedKernel(format: .bzImage, entry: GuestAddress(0x10_0200), start: GuestAddress(0x10_0000),
                            end: GuestAddress(0x140_0000), setupHeader: header)
    }

    @Test func goesAsHighAsPossiblePageAligned() throws {
        let m = try testMemory()
        let at = try InitrdPlacer.place(size: 1_000_001, kernel: Self.vmlinux(), memory: m, path: "initrd")
        #expect(at.raw == ((64 << 20) - 1_000_001) & ~0xFFF)
        #expect(at.raw % 4096 == 0 && at.raw + 1_000_001 <= 64 << 20)
    }

    @Test func fitsExactlyAboveThePageRoundedKernelEnd() throws {
        let m = try testMemory()
        // Kernel ends one byte into a page: the initrd may start only at the next page.
        let k = Self.vmlinux(end: 0x200_0001)
        let room: UInt64 = (64 << 20) - 0x200_1000
        #expect(try InitrdPlacer.place(size: room, kernel: k, memory: m, path: "i") == GuestAddress(0x200_1000))
        #expect(throws: LinuxBootError.initrdDoesNotFit(path: "i", size: room + 1, room: room, limit: 0xFFFF_FFFF)) {
            try InitrdPlacer.place(size: room + 1, kernel: k, memory: m, path: "i")
        }
    }

    @Test func tooBigIsAClearError() throws {
        let m = try testMemory()
        do {
            _ = try InitrdPlacer.place(size: 40 << 20, kernel: Self.vmlinux(), memory: m, path: "/x/initrd.cpio")
            Issue.record("a 40 MiB initrd fitted into 32 MiB")
        } catch {
            #expect(error == .initrdDoesNotFit(path: "/x/initrd.cpio", size: 40 << 20, room: 32 << 20, limit: 0xFFFF_FFFF))
            #expect(error.description.contains("/x/initrd.cpio") && error.description.contains("\(40 << 20)")
                && error.description.contains("\(32 << 20)") && error.description.contains("--memory"))
        }
    }

    @Test func staysBelow4GiB() throws {
        // RAM from 3 GiB to 4 GiB + 16 MiB: the initrd ends at 4 GiB, not at the top.
        let m = try GuestMemory(layout: [(GuestAddress(0), 64 << 20), (GuestAddress(3 << 30), (1 << 30) + (16 << 20))])
        let at = try InitrdPlacer.place(size: 1 << 20, kernel: Self.vmlinux(), memory: m, path: "i")
        #expect(at.raw == (1 << 32) - (1 << 20))
        // RAM only above 4 GiB besides low memory: low memory it is.
        let high = try GuestMemory(layout: [(GuestAddress(0), 64 << 20), (GuestAddress(1 << 32), 64 << 20)])
        let low = try InitrdPlacer.place(size: 1 << 20, kernel: Self.vmlinux(), memory: high, path: "i")
        #expect(low.raw + (1 << 20) <= 64 << 20)
    }

    @Test func respectsTheKernelsInitrdAddrMax() throws {
        let m = try testMemory()
        let k = Self.bzImage(initrdAddrMax: 0x2FF_FFFF)
        #expect(k.initrdAddressMax == 0x2FF_FFFF)
        let at = try InitrdPlacer.place(size: 4096, kernel: k, memory: m, path: "i")
        #expect(at.raw == 0x300_0000 - 4096)
        // And the caller's own limit, whichever is lower.
        let capped = try InitrdPlacer.place(size: 4096, kernel: Self.vmlinux(), memory: m, path: "i", maxAddress: 0x2FF_FFFF)
        #expect(capped.raw == 0x300_0000 - 4096)
        // A limit below the kernel's end leaves no room at all.
        #expect(throws: LinuxBootError.initrdDoesNotFit(path: "i", size: 4096, room: 0, limit: 0xFF_FFFF)) {
            try InitrdPlacer.place(size: 4096, kernel: Self.bzImage(initrdAddrMax: 0xFF_FFFF), memory: m, path: "i")
        }
    }

    @Test func neverOverlapsTheKernel() throws {
        let m = try testMemory()
        for size: UInt64 in [1, 4096, 1 << 20, 30 << 20, (64 << 20) - 0x200_0000] {
            let k = Self.vmlinux()
            let at = try InitrdPlacer.place(size: size, kernel: k, memory: m, path: "i")
            #expect(at.raw >= k.end.raw && at.raw + size <= 64 << 20)
        }
    }

    /// The initrd lies inside one region: free space split across two adjacent regions does not add up.
    @Test func staysInsideOneRegion() throws {
        let m = try GuestMemory(layout: [(GuestAddress(0), 32 << 20), (GuestAddress(32 << 20), 8 << 20)])
        let k = Self.vmlinux(end: 31 << 20)
        #expect(try InitrdPlacer.place(size: 8 << 20, kernel: k, memory: m, path: "i") == GuestAddress(32 << 20))
        #expect(throws: LinuxBootError.initrdDoesNotFit(path: "i", size: 9 << 20, room: 8 << 20, limit: 0xFFFF_FFFF)) {
            try InitrdPlacer.place(size: 9 << 20, kernel: k, memory: m, path: "i")
        }
        // 1 MiB fits in the higher region's top, which wins over the lower region.
        #expect(try InitrdPlacer.place(size: 1 << 20, kernel: k, memory: m, path: "i") == GuestAddress(39 << 20))
    }
}
