import GuestMemory

/// Memory types of the e820 map (bootparam.h, E820_TYPE_*); a direct-boot guest only needs RAM and reserved.
public enum E820Type: UInt32, Sendable {
    case ram = 1
    case reserved = 2
    case acpi = 3
    case nvs = 4
    case unusable = 5
    case persistentMemory = 7
}

/// One range of the memory map the kernel gets in boot_params (struct boot_e820_entry, 20 bytes packed).
public struct E820Entry: Equatable, Sendable {
    public var address: UInt64
    public var size: UInt64
    public var type: E820Type

    public init(address: UInt64, size: UInt64, type: E820Type) {
        self.address = address
        self.size = size
        self.type = type
    }

    /// Where conventional memory ends on a PC and the EBDA begins. Early
    /// kernel code looks for BIOS structures (EBDA, MP tables) up to 1 MiB, so
    /// the range is reported reserved even though the VMM backs it with RAM.
    public static let lowMemoryEnd: UInt64 = 0x9_FC00
    /// The first byte above the legacy BIOS area.
    public static let highMemoryStart: UInt64 = 0x10_0000

    /// The guest's memory map: RAM [0, 0x9FC00), reserved [0x9FC00, 1 MiB),
    /// RAM from 1 MiB to the end of the first region, and every further region
    /// as RAM. Region parts that fall inside the legacy hole are left out of RAM.
    public static func e820Map(memory: GuestMemory) -> [E820Entry] {
        var entries: [E820Entry] = []
        var holeReported = false
        for region in memory.regions {
            let start = region.start.raw
            let end = start + region.size  // cannot overflow: GuestMemory checked it
            if start < lowMemoryEnd {
                entries.append(E820Entry(address: start, size: min(end, lowMemoryEnd) - start, type: .ram))
            }
            if start < highMemoryStart, !holeReported {
                entries.append(E820Entry(address: lowMemoryEnd, size: highMemoryStart - lowMemoryEnd, type: .reserved))
                holeReported = true
            }
            let highStart = max(start, highMemoryStart)
            if end > highStart {
                entries.append(E820Entry(address: highStart, size: end - highStart, type: .ram))
            }
        }
        return entries
    }

    /// The same map, under the name the VMM first used.
    public static func map(for memory: GuestMemory) -> [E820Entry] { e820Map(memory: memory) }
}
