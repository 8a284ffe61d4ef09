import GuestMemory

/// The 4 KiB "zero page" (struct boot_params) whose address the kernel gets in RSI.
///
/// Built as plain bytes with named offsets rather than a Swift struct mirroring
/// the C layout, because the C struct is packed and Swift has no packed layout;
/// the offsets come from Documentation/arch/x86/boot.rst and
/// arch/x86/include/uapi/asm/bootparam.h, and the tests pin each one.
public struct BootParams: Sendable {
    public static let size = 4096

    // boot_params fields outside the setup header.
    public static let extRamdiskImage = 0x0C0
    public static let extRamdiskSize = 0x0C4
    public static let extCmdLinePtr = 0x0C8
    public static let e820Entries = 0x1E8
    /// If non-zero, the kernel assumes a loader that copied garbage and clears fields; we leave it 0.
    public static let sentinel = 0x1EF
    public static let e820Table = 0x2D0
    public static let e820MaxEntries = 128
    public static let e820EntrySize = 20

    // The setup header (struct setup_header), at its boot_params offsets.
    public static let setupHeader = 0x1F1
    public static let setupSects = 0x1F1
    public static let syssize = 0x1F4
    public static let bootFlag = 0x1FE
    public static let jump = 0x200
    public static let header = 0x202
    public static let version = 0x206
    public static let typeOfLoader = 0x210
    public static let loadFlags = 0x211
    public static let ramdiskImage = 0x218
    public static let ramdiskSize = 0x21C
    public static let heapEndPtr = 0x224
    public static let cmdLinePtr = 0x228
    public static let initrdAddrMax = 0x22C
    public static let kernelAlignment = 0x230
    public static let relocatableKernel = 0x234
    public static let xloadflags = 0x236
    public static let cmdlineSize = 0x238
    public static let hardwareSubarch = 0x23C
    public static let hardwareSubarchData = 0x240
    public static let setupData = 0x250
    public static let prefAddress = 0x258
    public static let initSize = 0x260
    /// Where boot_params stops reserving room for the setup header (edd_mbr_sig_buffer follows).
    public static let setupHeaderLimit = 0x290

    // loadflags bits.
    public static let loadedHigh: UInt8 = 0x01
    public static let canUseHeap: UInt8 = 0x80

    /// "HdrS", little-endian.
    static let headerMagic: UInt32 = 0x5372_6448
    /// What a vmlinux gets as its protocol version: 2.15, the newest that this header layout describes.
    static let synthesizedVersion: UInt16 = 0x020F
    /// "Undefined" loader: no registered loader ID applies to a VMM.
    static let loaderUndefined: UInt8 = 0xFF
    /// boot.rst's example: heap end 0xE000 from the real-mode base, stored minus 0x200.
    static let heapEnd: UInt16 = 0xDE00

    public private(set) var bytes = [UInt8](repeating: 0, count: BootParams.size)
    /// True for a vmlinux: the header was made here, not copied from the kernel image.
    let headerIsSynthesized: Bool

    /// A zero page for `kernel`: its own setup header for a bzImage, a minimal
    /// synthesized one for a vmlinux (which has none but whose early code still
    /// reads a few header fields), plus the fields every loader must set.
    public init(kernel: LoadedKernel) {
        headerIsSynthesized = kernel.setupHeader == nil
        if let header = kernel.setupHeader {
            let n = min(header.count, Self.setupHeaderLimit - Self.setupHeader)
            bytes.replaceSubrange(Self.setupHeader..<(Self.setupHeader + n), with: header.prefix(n))
            // Fields the loader owns: whatever the image file holds there is not ours to pass on.
            put(UInt32(0), at: Self.ramdiskImage)
            put(UInt32(0), at: Self.ramdiskSize)
            put(UInt32(0), at: Self.cmdLinePtr)
            put(UInt32(0), at: Self.hardwareSubarch)  // 0: a normal PC
            put(UInt64(0), at: Self.hardwareSubarchData)
            put(UInt64(0), at: Self.setupData)  // no setup_data list
            bytes[Self.loadFlags] |= Self.canUseHeap
            put(Self.heapEnd, at: Self.heapEndPtr)
        } else {
            put(UInt16(0xAA55), at: Self.bootFlag)
            put(Self.headerMagic, at: Self.header)
            put(Self.synthesizedVersion, at: Self.version)
            put(UInt32(0x100_0000), at: Self.kernelAlignment)  // x86-64's CONFIG_PHYSICAL_ALIGN default
        }
        bytes[Self.typeOfLoader] = Self.loaderUndefined
        bytes[Self.loadFlags] |= Self.loadedHigh
    }

    /// The highest address the kernel accepts for the initrd.
    public var initrdAddressMax: UInt64 {
        let v = get(UInt32.self, at: Self.initrdAddrMax)
        return v == 0 ? 0x37FF_FFFF : UInt64(v)
    }

    /// Points the kernel at its command line: `size` bytes, NUL excluded. A
    /// bzImage's cmdline_size is left alone (it is the kernel's limit, for the
    /// loader to read); a vmlinux's synthesized header gets the actual length.
    public mutating func setCommandLine(address: GuestAddress, size: UInt32) {
        put(UInt32(truncatingIfNeeded: address.raw), at: Self.cmdLinePtr)
        put(UInt32(truncatingIfNeeded: address.raw >> 32), at: Self.extCmdLinePtr)
        if headerIsSynthesized { put(size, at: Self.cmdlineSize) }
    }

    /// Tells the kernel where the initrd is; the high halves go to the ext_ fields.
    public mutating func setInitrd(address: GuestAddress, size: UInt64) {
        put(UInt32(truncatingIfNeeded: address.raw), at: Self.ramdiskImage)
        put(UInt32(truncatingIfNeeded: size), at: Self.ramdiskSize)
        put(UInt32(truncatingIfNeeded: address.raw >> 32), at: Self.extRamdiskImage)
        put(UInt32(truncatingIfNeeded: size >> 32), at: Self.extRamdiskSize)
    }

    /// Points the kernel at the first node of a setup_data list (0: none).
    public mutating func setSetupData(address: GuestAddress) {
        put(address.raw, at: Self.setupData)
    }

    /// The guest's physical memory map, which the kernel trusts as its only source of RAM ranges.
    public mutating func setE820(_ entries: [E820Entry]) throws(LinuxBootError) {
        guard entries.count <= Self.e820MaxEntries else { throw .tooManyE820Entries(count: entries.count) }
        let table = Self.e820Table..<(Self.e820Table + Self.e820MaxEntries * Self.e820EntrySize)
        bytes.replaceSubrange(table, with: repeatElement(0, count: table.count))  // no stale entries from an earlier call
        for (i, e) in entries.enumerated() {
            let at = Self.e820Table + i * Self.e820EntrySize
            put(e.address, at: at)
            put(e.size, at: at + 8)
            put(e.type.rawValue, at: at + 16)
        }
        bytes[Self.e820Entries] = UInt8(entries.count)
    }

    /// Copies the page into guest RAM.
    public func write(to memory: GuestMemory, at address: GuestAddress) throws(LinuxBootError) {
        do { try memory.write(bytes, at: address) } catch { throw .bootParamsOutsideMemory(address: address) }
    }

    /// Little-endian store. Offsets are this file's constants, always inside the page.
    mutating func put<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        for i in 0..<MemoryLayout<T>.size { bytes[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * i)) }
    }

    /// Little-endian load, for tests and derived properties.
    func get<T: FixedWidthInteger>(_: T.Type, at offset: Int) -> T {
        var value: T = 0
        for i in 0..<MemoryLayout<T>.size { value |= T(bytes[offset + i]) << (8 * i) }
        return value
    }
}

/// A node of the boot protocol's setup_data list: next (u64, guest-physical, 0 ends the
/// list), type (u32), len (u32), then len bytes.
public enum SetupData {
    /// SETUP_RNG_SEED: entropy the kernel mixes into its random pool before any
    /// driver runs; credited when the command line has random.trust_bootloader=on.
    public static let rngSeedType: UInt32 = 9

    public static func node(type: UInt32, payload: [UInt8], next: UInt64 = 0) -> [UInt8] {
        var bytes: [UInt8] = []
        for i in 0..<8 { bytes.append(UInt8(truncatingIfNeeded: next >> (8 * i))) }
        for i in 0..<4 { bytes.append(UInt8(truncatingIfNeeded: type >> (8 * i))) }
        for i in 0..<4 { bytes.append(UInt8(truncatingIfNeeded: UInt32(payload.count) >> (8 * i))) }
        return bytes + payload
    }
}
