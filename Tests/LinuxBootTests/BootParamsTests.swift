import GuestMemory
import Testing
@testable import LinuxBoot

@Suite struct BootParamsTests {
    static let vmlinux = LoadedKernel(format: .elf, entry: GuestAddress(0x100_0000), start: GuestAddress(0x100_0000),
                                      end: GuestAddress(0x200_0000), setupHeader: nil)

    /// The offsets, pinned to Documentation/arch/x86/boot.rst and uapi/asm/bootparam.h.
    @Test func namedOffsetsMatchTheBootProtocol() {
        let pinned: [(Int, Int)] = [
            (BootParams.extRamdiskImage, 0x0C0), (BootParams.extRamdiskSize, 0x0C4), (BootParams.extCmdLinePtr, 0x0C8),
            (BootParams.e820Entries, 0x1E8), (BootParams.sentinel, 0x1EF), (BootParams.setupSects, 0x1F1),
            (BootParams.syssize, 0x1F4), (BootParams.bootFlag, 0x1FE), (BootParams.jump, 0x200), (BootParams.header, 0x202),
            (BootParams.version, 0x206), (BootParams.typeOfLoader, 0x210), (BootParams.loadFlags, 0x211),
            (BootParams.ramdiskImage, 0x218), (BootParams.ramdiskSize, 0x21C), (BootParams.heapEndPtr, 0x224),
            (BootParams.cmdLinePtr, 0x228), (BootParams.initrdAddrMax, 0x22C), (BootParams.kernelAlignment, 0x230),
            (BootParams.relocatableKernel, 0x234), (BootParams.xloadflags, 0x236), (BootParams.cmdlineSize, 0x238),
            (BootParams.hardwareSubarch, 0x23C), (BootParams.hardwareSubarchData, 0x240), (BootParams.setupData, 0x250),
            (BootParams.prefAddress, 0x258), (BootParams.initSize, 0x260), (BootParams.setupHeaderLimit, 0x290),
            (BootParams.e820Table, 0x2D0), (BootParams.e820EntrySize, 20), (BootParams.e820MaxEntries, 128),
        ]
        for (actual, expected) in pinned { #expect(actual == expected) }
        // The e820 table ends before eddbuf (0xD00), and the page is 4 KiB.
        #expect(BootParams.e820Table + BootParams.e820MaxEntries * BootParams.e820EntrySize == 0xCD0)
        #expect(BootParams.size == 4096)
    }

    /// Every setter's value, read back at the protocol's raw offsets (not the named constants).
    @Test func fieldsLandAtTheirOffsets() throws {
        var params = BootParams(kernel: Self.vmlinux)
        params.setCommandLine(address: GuestAddress(0x1_0002_0000), size: 42)
        params.setInitrd(address: GuestAddress(0x2_3456_7000), size: 0x1_0000_0123)
        try params.setE820([E820Entry(address: 0, size: 0x9FC00, type: .ram),
                            E820Entry(address: 0x9FC00, size: 0x60400, type: .reserved),
                            E820Entry(address: 0x1_0000_0000, size: 0x4000_0000, type: .acpi)])
        let p = params.bytes
        #expect(p.count == 4096)
        #expect(readLE(UInt32.self, p, 0x228) == 0x0002_0000 && readLE(UInt32.self, p, 0x0C8) == 1)  // cmd_line_ptr, ext_
        #expect(readLE(UInt32.self, p, 0x238) == 42)  // cmdline_size: the length, for a vmlinux
        #expect(readLE(UInt32.self, p, 0x218) == 0x3456_7000 && readLE(UInt32.self, p, 0x0C0) == 2)  // ramdisk_image, ext_
        #expect(readLE(UInt32.self, p, 0x21C) == 0x123 && readLE(UInt32.self, p, 0x0C4) == 1)  // ramdisk_size, ext_
        #expect(p[0x1E8] == 3)
        #expect(readLE(UInt64.self, p, 0x2D0) == 0 && readLE(UInt64.self, p, 0x2D8) == 0x9FC00 && readLE(UInt32.self, p, 0x2E0) == 1)
        #expect(readLE(UInt64.self, p, 0x2E4) == 0x9FC00 && readLE(UInt64.self, p, 0x2EC) == 0x60400 && readLE(UInt32.self, p, 0x2F4) == 2)
        #expect(readLE(UInt64.self, p, 0x2F8) == 0x1_0000_0000 && readLE(UInt64.self, p, 0x300) == 0x4000_0000)
        #expect(readLE(UInt32.self, p, 0x308) == 3)
        #expect(p[0x1EF] == 0)  // sentinel: left clear so the kernel does not wipe ext_ fields
    }

    @Test func aVmlinuxGetsASynthesizedHeader() {
        let p = BootParams(kernel: Self.vmlinux).bytes
        #expect(readLE(UInt16.self, p, 0x1FE) == 0xAA55)
        #expect(Array(p[0x202..<0x206]) == Array("HdrS".utf8))
        #expect(readLE(UInt16.self, p, 0x206) == 0x020F)
        #expect(p[0x210] == 0xFF)  // type_of_loader: undefined
        #expect(p[0x211] == 0x01)  // LOADED_HIGH only: no real-mode heap for a vmlinux
        #expect(readLE(UInt32.self, p, 0x230) == 0x100_0000)
        #expect(readLE(UInt16.self, p, 0x224) == 0)
        // Nothing else is set: everything outside the few fields above is zero.
        let set: Set<Int> = [0x1FE, 0x1FF, 0x202, 0x203, 0x204, 0x205, 0x206, 0x207, 0x210, 0x211, 0x230, 0x231, 0x232, 0x233]
        #expect(p.indices.allSatisfy { set.contains($0) || p[$0] == 0 })
    }

    @Test func aBzImageKeepsItsHeaderAndGetsTheLoaderFields() throws {
        var image = BzImage.build()
        // Junk in fields the loader owns must not reach the kernel.
        image.replaceSubrange(0x218..<0x220, with: [UInt8](repeating: 0x77, count: 8))  // ramdisk_image, ramdisk_size
        image.replaceSubrange(0x228..<0x22C, with: [UInt8](repeating: 0x77, count: 4))  // cmd_line_ptr
        image.replaceSubrange(0x250..<0x258, with: [UInt8](repeating: 0x77, count: 8))  // setup_data
        let k = try KernelLoader.load(image, path: "bz", into: testMemory())
        var params = BootParams(kernel: k)
        params.setCommandLine(address: GuestAddress(0x20000), size: 100)
        let p = params.bytes
        #expect(p[0x1F1] == 2)  // setup_sects, from the image
        #expect(readLE(UInt16.self, p, 0x1FE) == 0xAA55 && Array(p[0x202..<0x206]) == Array("HdrS".utf8))
        #expect(readLE(UInt16.self, p, 0x206) == 0x020F && readLE(UInt16.self, p, 0x236) == 1)
        #expect(p[0x210] == 0xFF)
        #expect(p[0x211] == 0x81)  // LOADED_HIGH | CAN_USE_HEAP
        #expect(readLE(UInt16.self, p, 0x224) == 0xDE00)
        #expect(readLE(UInt32.self, p, 0x22C) == 0x7FFF_FFFF && readLE(UInt32.self, p, 0x230) == 0x20_0000)
        #expect(readLE(UInt32.self, p, 0x238) == 0x7FF)  // cmdline_size stays the kernel's limit
        #expect(readLE(UInt32.self, p, 0x228) == 0x20000)
        #expect(readLE(UInt64.self, p, 0x218) == 0 && readLE(UInt64.self, p, 0x250) == 0)
        #expect(params.initrdAddressMax == 0x7FFF_FFFF)
    }

    @Test func e820TableHolds128EntriesAndNoMore() throws {
        var params = BootParams(kernel: Self.vmlinux)
        let full = (0..<128).map { E820Entry(address: UInt64($0) << 20, size: 4096, type: .ram) }
        try params.setE820(full)
        #expect(params.bytes[0x1E8] == 128)
        #expect(readLE(UInt64.self, params.bytes, 0x2D0 + 127 * 20) == 127 << 20)
        let many = full + [E820Entry(address: 1 << 40, size: 4096, type: .ram)]
        #expect(throws: LinuxBootError.tooManyE820Entries(count: 129)) { try params.setE820(many) }
        #expect(params.bytes[0x1E8] == 128)  // unchanged by the refused call
        // A shorter map replaces a longer one completely.
        try params.setE820([E820Entry(address: 0, size: 4096, type: .ram)])
        #expect(params.bytes[0x1E8] == 1 && params.bytes[(0x2D0 + 20)..<0xCD0].allSatisfy { $0 == 0 })
    }

    @Test func writesThePageIntoGuestMemory() throws {
        let m = try testMemory()
        var params = BootParams(kernel: Self.vmlinux)
        try params.setE820(E820Entry.e820Map(memory: m))
        try params.write(to: m, at: GuestAddress(0x7000))
        #expect(try m.readBytes(at: GuestAddress(0x7000), count: 4096) == params.bytes)
        #expect(throws: LinuxBootError.bootParamsOutsideMemory(address: GuestAddress((64 << 20) - 100))) {
            try params.write(to: m, at: GuestAddress((64 << 20) - 100))
        }
    }
}
