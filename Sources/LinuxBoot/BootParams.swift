import GuestMemory

/// E820 memory types the guest is told about.
public enum E820Type: UInt32, Sendable {
    case ram = 1
    case reserved = 2
}

public struct E820Entry: Equatable, Sendable {
    public var address: UInt64
    public var size: UInt64
    public var type: E820Type

    public init(address: UInt64, size: UInt64, type: E820Type) {
        self.address = address; self.size = size; self.type = type
    }

    /// The end of conventional memory, where the EBDA and BIOS area begin on a PC.
    public static let lowMemoryEnd: UInt64 = 0x9_FC00
    public static let highMemoryStart: UInt64 = 0x10_0000

    /// The guest's memory map: low RAM, the legacy BIOS hole reserved, RAM from
    /// 1 MiB to the end of the first region, and every further region as RAM.
    public static func map(for memory: GuestMemory) -> [E820Entry] {
        var entries: [E820Entry] = []
        for (i, r) in memory.regions.enumerated() {
            if i == 0 && r.start.raw == 0 && r.size > highMemoryStart {
                entries.append(E820Entry(address: 0, size: lowMemoryEnd, type: .ram))
                entries.append(E820Entry(address: lowMemoryEnd, size: highMemoryStart - lowMemoryEnd, type: .reserved))
                entries.append(E820Entry(address: highMemoryStart, size: r.size - highMemoryStart, type: .ram))
            } else {
                entries.append(E820Entry(address: r.start.raw, size: r.size, type: .ram))
            }
        }
        return entries
    }
}

/// The 4 KiB "zero page" (struct boot_params) handed to the kernel in RSI.
///
/// Field offsets follow the boot protocol (Documentation/arch/x86/boot.rst and
/// arch/x86/include/uapi/asm/bootparam.h); the tests pin each one.
public struct BootParams: Sendable {
    public static let size = 4096

    // Offsets into boot_params.
    public static let extRamdiskImage = 0x0C0
    public static let extRamdiskSize = 0x0C4
    public static let extCmdLinePtr = 0x0C8
    public static let e820Entries = 0x1E8
    public static let setupHeader = 0x1F1
    public static let setupSects = 0x1F1
    public static let bootFlag = 0x1FE
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
    public static let xloadflags = 0x236
    public static let cmdlineSize = 0x238
    public static let e820Table = 0x2D0
    public static let e820MaxEntries = 128
    public static let e820EntrySize = 20

    // loadflags bits.
    public static let loadedHigh: UInt8 = 0x01
    public static let canUseHeap: UInt8 = 0x80

    public private(set) var bytes = [UInt8](repeating: 0, count: BootParams.size)

    public init(kernel: LoadedKernel) {
        if let header = kernel.setupHeader {
            // bzImage: the kernel's own setup header, then the loader's fields on top.
            let n = min(header.count, Self.size - Self.setupHeader)
            bytes.replaceSubrange(Self.setupHeader..<(Self.setupHeader + n), with: header.prefix(n))
            bytes[Self.loadFlags] |= Self.canUseHeap
            put(UInt16(0xDE00), at: Self.heapEndPtr)  // heap end relative to the real-mode code, as boot.rst suggests
        } else {
            // vmlinux carries no setup header: write the fields the kernel checks.
            put(UInt16(0xAA55), at: Self.bootFlag)
            put(UInt32(0x5372_6448), at: Self.header)  // "HdrS"
            put(UInt16(0x020F), at: Self.version)
            put(UInt32(0x100_0000), at: Self.kernelAlignment)
        }
        bytes[Self.typeOfLoader] = 0xFF  // "undefined" loader
        bytes[Self.loadFlags] |= Self.loadedHigh
    }

    /// Little-endian store into the page.
    mutating func put<T: FixedWidthInteger>(_ value: T, at offset: Int) {
        for i in 0..<MemoryLayout<T>.size { bytes[offset + i] = UInt8(truncatingIfNeeded: value >> T(8 * i)) }
    }

    func get<T: FixedWidthInteger>(_: T.Type, at offset: Int) -> T {
        var v: T = 0
        for i in 0..<MemoryLayout<T>.size { v |= T(bytes[offset + i]) << T(8 * i) }
        return v
    }

    /// The highest address the kernel accepts for the initrd (bzImage header; 2 GiB - 1 for old protocols).
    public var initrdAddressMax: UInt64 {
        let v = get(UInt32.self, at: Self.initrdAddrMax)
        return v == 0 ? 0x7FFF_FFFF : UInt64(v)
    }

    public mutating func setCommandLine(address: GuestAddress, size: UInt32) {
        put(UInt32(truncatingIfNeeded: address.raw), at: Self.cmdLinePtr)
        put(UInt32(truncatingIfNeeded: address.raw >> 32), at: Self.extCmdLinePtr)
        put(size, at: Self.cmdlineSize)
    }

    public mutating func setInitrd(address: GuestAddress, size: UInt64) {
        put(UInt32(truncatingIfNeeded: address.raw), at: Self.ramdiskImage)
        put(UInt32(truncatingIfNeeded: size), at: Self.ramdiskSize)
        put(UInt32(truncatingIfNeeded: address.raw >> 32), at: Self.extRamdiskImage)
        put(UInt32(truncatingIfNeeded: size >> 32), at: Self.extRamdiskSize)
    }

    public mutating func setE820(_ entries: [E820Entry]) throws(LinuxBootError) {
        guard entries.count <= Self.e820MaxEntries else { throw .tooManyMemoryRanges(entries.count) }
        bytes[Self.e820Entries] = UInt8(entries.count)
        for (i, e) in entries.enumerated() {
            let at = Self.e820Table + i * Self.e820EntrySize
            put(e.address, at: at)
            put(e.size, at: at + 8)
            put(e.type.rawValue, at: at + 16)
        }
    }

    public func write(to memory: GuestMemory, at address: GuestAddress) throws(LinuxBootError) {
        do { try memory.write(bytes, at: address) } catch { throw .memory(error) }
    }
}

/// Chooses where the initrd goes.
public enum InitrdPlacer {
    /// The highest page-aligned address where `size` bytes fit inside one RAM
    /// region, above the kernel, below 4 GiB and below the kernel's initrd limit.
    public static func place(size: UInt64, kernel: LoadedKernel, memory: GuestMemory, path: String,
                             maxAddress: UInt64? = nil) throws(LinuxBootError) -> GuestAddress {
        let limit = min(maxAddress ?? (kernel.setupHeader != nil ? BootParams(kernel: kernel).initrdAddressMax : 0xFFFF_FFFF), 0xFFFF_FFFF)
        var best: UInt64?
        var room: UInt64 = 0
        for r in memory.regions {
            let low = max(r.start.raw, (kernel.end.raw + 0xFFF) & ~0xFFF)
            let high = min(r.start.raw + r.size, limit &+ 1)  // one past the last usable byte
            guard high > low else { continue }
            room = max(room, high - low)
            guard size <= high - low else { continue }
            let at = (high - size) & ~UInt64(0xFFF)
            if at >= low { best = max(best ?? 0, at) }
        }
        guard let best else { throw .initrdDoesNotFit(path: path, size: size, room: room) }
        return GuestAddress(best)
    }
}
