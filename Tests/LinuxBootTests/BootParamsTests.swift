import GuestMemory
import Testing
@testable import LinuxBoot

@Suite struct BootParamsTests {
    static let elfKernel = LoadedKernel(format: .elf, entry: GuestAddress(0x100_0000), start: GuestAddress(0x100_0000),
                                        end: GuestAddress(0x200_0000), setupHeader: nil)

    func u16(_ b: [UInt8], _ o: Int) -> UInt16 { UInt16(b[o]) | UInt16(b[o + 1]) << 8 }
    func u32(_ b: [UInt8], _ o: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(b[o + $1]) << (8 * UInt32($1)) } }
    func u64(_ b: [UInt8], _ o: Int) -> UInt64 { (0..<8).reduce(0) { $0 | UInt64(b[o + $1]) << (8 * UInt64($1)) } }

    @Test func fieldOffsetsMatchTheBootProtocol() {
        // Pinned against Documentation/arch/x86/boot.rst and uapi/asm/bootparam.h.
        #expect(BootParams.extRamdiskImage == 0x0C0 && BootParams.extRamdiskSize == 0x0C4 && BootParams.extCmdLinePtr == 0x0C8)
        #expect(BootParams.e820Entries == 0x1E8 && BootParams.setupSects == 0x1F1 && BootParams.bootFlag == 0x1FE)
        #expect(BootParams.header == 0x202 && BootParams.version == 0x206 && BootParams.typeOfLoader == 0x210)
        #expect(BootParams.loadFlags == 0x211 && BootParams.ramdiskImage == 0x218 && BootParams.ramdiskSize == 0x21C)
        #expect(BootParams.heapEndPtr == 0x224 && BootParams.cmdLinePtr == 0x228 && BootParams.initrdAddrMax == 0x22C)
        #expect(BootParams.kernelAlignment == 0x230 && BootParams.xloadflags == 0x236 && BootParams.cmdlineSize == 0x238)
        #expect(BootParams.e820Table == 0x2D0 && BootParams.e820EntrySize == 20 && BootParams.e820MaxEntries == 128)
        #expect(BootParams.e820Table + 128 * 20 <= 0xCD0)  // e820_table ends before the next field (eddbuf at 0xD00)
    }

    @Test func vmlinuxGetsAMinimalHeader() {
        let p = BootParams(kernel: Self.elfKernel).bytes
        #expect(p.count == 4096)
        #expect(u16(p, 0x1FE) == 0xAA55)
        #expect(u32(p, 0x202) == 0x5372_6448)
        #expect(u16(p, 0x206) >= 0x020C)
        #expect(p[0x210] == 0xFF)
        #expect(p[0x211] & 0x01 == 0x01)
    }

    @Test func commandLineInitrdAndE820LandAtTheirOffsets() throws {
        var params = BootParams(kernel: Self.elfKernel)
        params.setCommandLine(address: GuestAddress(0x20000), size: 42)
        params.setInitrd(address: GuestAddress(0x1_2345_6000), size: 0x1_0000_0123)
        try params.setE820([E820Entry(address: 0, size: 0x9FC00, type: .ram),
                            E820Entry(address: 0x9FC00, size: 0x60400, type: .reserved)])
        let p = params.bytes
        #expect(u32(p, 0x228) == 0x20000 && u32(p, 0xC8) == 0 && u32(p, 0x238) == 42)
        #expect(u32(p, 0x218) == 0x2345_6000 && u32(p, 0xC0) == 1)
        #expect(u32(p, 0x21C) == 0x123 && u32(p, 0xC4) == 1)
        #expect(p[0x1E8] == 2)
        #expect(u64(p, 0x2D0) == 0 && u64(p, 0x2D8) == 0x9FC00 && u32(p, 0x2E0) == 1)
        #expect(u64(p, 0x2E4) == 0x9FC00 && u64(p, 0x2EC) == 0x60400 && u32(p, 0x2F4) == 2)
    }

    @Test func tooManyE820EntriesAreRejected() {
        var params = BootParams(kernel: Self.elfKernel)
        let many = (0..<129).map { E820Entry(address: UInt64($0) << 20, size: 4096, type: .ram) }
        #expect(throws: LinuxBootError.tooManyMemoryRanges(129)) { try params.setE820(many) }
    }

    @Test func e820MapReservesTheBIOSHoleAndListsHighRAM() throws {
        let memory = try GuestMemory(layout: [(GuestAddress(0), 64 << 20), (GuestAddress(1 << 32), 2 << 20)])
        let map = E820Entry.map(for: memory)
        #expect(map == [E820Entry(address: 0, size: 0x9FC00, type: .ram),
                        E820Entry(address: 0x9FC00, size: 0x100000 - 0x9FC00, type: .reserved),
                        E820Entry(address: 0x100000, size: (64 << 20) - 0x100000, type: .ram),
                        E820Entry(address: 1 << 32, size: 2 << 20, type: .ram)])
    }

    @Test func initrdGoesHighPageAlignedAndAboveTheKernel() throws {
        let memory = try GuestMemory(layout: [(GuestAddress(0), 64 << 20)])
        let at = try InitrdPlacer.place(size: 1_000_001, kernel: Self.elfKernel, memory: memory, path: "initrd")
        #expect(at.raw % 4096 == 0)
        #expect(at.raw + 1_000_001 <= 64 << 20)
        #expect(at.raw >= 0x200_0000)
        #expect(at.raw > (64 << 20) - 1_000_001 - 4096)
    }

    @Test func initrdThatDoesNotFitIsAClearError() throws {
        let memory = try GuestMemory(layout: [(GuestAddress(0), 64 << 20)])
        #expect(throws: LinuxBootError.self) {
            try InitrdPlacer.place(size: 40 << 20, kernel: Self.elfKernel, memory: memory, path: "/x/initrd")
        }
        do {
            _ = try InitrdPlacer.place(size: 40 << 20, kernel: Self.elfKernel, memory: memory, path: "/x/initrd")
        } catch {
            #expect(error.description.contains("/x/initrd") && error.description.contains("--memory"))
        }
    }

    @Test func initrdStaysBelowTheKernelsLimit() throws {
        let memory = try GuestMemory(layout: [(GuestAddress(0), 64 << 20)])
        let at = try InitrdPlacer.place(size: 4096, kernel: Self.elfKernel, memory: memory, path: "i", maxAddress: 0x2FF_FFFF)
        #expect(at.raw + 4096 <= 0x300_0000)
    }
}

@Suite struct KernelCommandLineTests {
    @Test func appendsWithSingleSpaces() throws {
        var c = try KernelCommandLine("console=ttyS0")
        try c.append("  reboot=k panic=-1 ")
        try c.append("")
        try c.append(key: "root", value: "/dev/vda")
        #expect(c.string == "console=ttyS0 reboot=k panic=-1 root=/dev/vda")
        #expect(c.bytesWithNUL.last == 0 && c.bytesWithNUL.count == c.string.utf8.count + 1)
        #expect(c.contains(key: "panic") && c.contains(key: "console") && !c.contains(key: "pani"))
    }

    @Test func quotesValuesWithSpaces() throws {
        var c = try KernelCommandLine()
        try c.append(key: "airlock.msg", value: "hello world")
        #expect(c.string == "airlock.msg=\"hello world\"")
        #expect(throws: LinuxBootError.self) { try c.append(key: "bad key", value: "x") }
        #expect(throws: LinuxBootError.self) { try c.append(key: "k", value: "a\"b") }
    }

    @Test func rejectsNULBytes() throws {
        var c = try KernelCommandLine()
        #expect(throws: LinuxBootError.self) { try c.append("a\u{0}b") }
    }

    @Test func capacityIsExactIncludingTheNUL() throws {
        var c = try KernelCommandLine()
        try c.append(String(repeating: "a", count: 2047))
        #expect(c.bytesWithNUL.count == 2048)
        var d = try KernelCommandLine()
        #expect(throws: LinuxBootError.commandLineTooLong(length: 2048, capacity: 2048)) {
            try d.append(String(repeating: "a", count: 2048))
        }
        var e = try KernelCommandLine(String(repeating: "b", count: 2040))
        #expect(throws: LinuxBootError.self) { try e.append("1234567") }  // 2040 + space + 7 = 2048 > 2047
        #expect(e.string.count == 2040)  // a refused append leaves the line as it was
    }
}
