import GuestMemory

/// Where things live in guest-physical memory on an x86-64 Airlock machine.
///
/// Low memory holds the boot structures the 64-bit entry needs; the kernel
/// loads itself at its own physical address (16 MiB for a default vmlinux);
/// RAM stops below the 32-bit MMIO window and continues above 4 GiB.
public enum Layout {
    /// GDT: null, code64, data, TSS (4 entries).
    public static let gdtAddress = GuestAddress(0x500)
    /// An empty IDT: the kernel loads its own before enabling interrupts.
    public static let idtAddress = GuestAddress(0x520)
    /// Boot-time stack (grows down), used only until the kernel switches to its own.
    public static let bootStackPointer: UInt64 = 0x8FF0
    /// setup_data nodes (the RNG seed), below the zero page; the kernel reserves them itself.
    public static let setupDataAddress = GuestAddress(0x6000)
    public static let setupDataCapacity = 0x1000
    /// The zero page (struct boot_params).
    public static let zeroPageAddress = GuestAddress(0x7000)
    /// Page tables: one PML4, one PDPT, four page directories (2 MiB pages) mapping 0-4 GiB 1:1.
    public static let pml4Address = GuestAddress(0x9000)
    public static let pdptAddress = GuestAddress(0xA000)
    public static let pageDirectoryAddress = GuestAddress(0xB000)
    public static let identityMappedGiB: UInt64 = 4
    /// The kernel command line (NUL-terminated).
    public static let commandLineAddress = GuestAddress(0x20000)
    public static let commandLineCapacity = 2048
    /// The VIF page the VMM registers on a PVM host in native mode, before the first
    /// instruction: in the range e820 reports reserved (0x9FC00 to 1 MiB), so the
    /// kernel never allocates it. The kernel moves to a page of its own at once.
    public static let pvBootVIFAddress = GuestAddress(0xA0000)
    /// Lowest address RAM must reach for the structures above plus a kernel.
    public static let minimumMemory: UInt64 = 32 << 20

    /// Start of the 32-bit MMIO window (virtio-mmio devices live here); RAM above it is moved past 4 GiB.
    public static let mmioWindowStart: UInt64 = 0xC000_0000
    public static let mmioWindowEnd: UInt64 = 0x1_0000_0000
    /// virtio-mmio devices: one 4 KiB window each from here, inside the MMIO window.
    public static let virtioMMIOBase: UInt64 = 0xD000_0000
    /// Their interrupts: ISA lines the PIC has free (4 is the UART's).
    public static let virtioIRQs: [UInt32] = [5, 6, 7, 9, 10, 11, 12, 14, 15]

    /// KVM's private pages for the real-mode TSS and EPT identity map, just below the BIOS area at the top of 4 GiB.
    public static let tssAddress: UInt64 = 0xFFFB_D000
    public static let identityMapAddress: UInt64 = 0xFFFB_C000

    /// RAM regions for a machine with `memory` bytes.
    public static func ramRegions(memory: UInt64) -> [(start: GuestAddress, size: UInt64)] {
        if memory <= mmioWindowStart { return [(GuestAddress(0), memory)] }
        return [(GuestAddress(0), mmioWindowStart), (GuestAddress(mmioWindowEnd), memory - mmioWindowStart)]
    }
}

/// The legacy PC devices' fixed places.
public enum LegacyPorts {
    public static let com1: UInt64 = 0x3F8
    public static let com1Length: UInt64 = 8
    public static let com1IRQ: UInt32 = 4
    /// i8042 data port 0x60 through command port 0x64, registered as one range.
    public static let i8042: UInt64 = 0x60
    public static let i8042Length: UInt64 = 5
}
