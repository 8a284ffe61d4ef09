import GuestMemory
import KVM

/// The boot-time x86-64 CPU state for Linux's 64-bit entry: descriptor tables,
/// identity page tables and the register values. Pure functions of the layout,
/// so tests can check every byte without KVM.
public enum CPUSetup {
    // Segment selectors: index * 8.
    public static let codeSelector: UInt16 = 0x08
    public static let dataSelector: UInt16 = 0x10
    public static let tssSelector: UInt16 = 0x18

    /// Encodes a GDT descriptor from its flags (G, D/B, L, AVL in bits 15..12 of
    /// `flags`, access byte in bits 7..0), base and 20-bit limit.
    public static func gdtEntry(flags: UInt16, base: UInt32, limit: UInt32) -> UInt64 {
        let base = UInt64(base), limit = UInt64(limit), flags = UInt64(flags)
        return ((base & 0xFF00_0000) << 32) | ((flags & 0xF0FF) << 40) | ((limit & 0x000F_0000) << 32)
            | ((base & 0x00FF_FFFF) << 16) | (limit & 0x0000_FFFF)
    }

    /// Null, 64-bit code (0xA09B), flat data (0xC093), busy 64-bit TSS (0x808B).
    public static let gdt: [UInt64] = [
        0,
        gdtEntry(flags: 0xA09B, base: 0, limit: 0xFFFFF),
        gdtEntry(flags: 0xC093, base: 0, limit: 0xFFFFF),
        gdtEntry(flags: 0x808B, base: 0, limit: 0xFFFFF),
    ]

    /// Decodes a descriptor into the segment state KVM wants alongside it.
    public static func segment(from entry: UInt64, selector: UInt16) -> Segment {
        let base = ((entry >> 16) & 0xFF_FFFF) | ((entry >> 32) & 0xFF00_0000)
        let limit = UInt32((entry & 0xFFFF) | ((entry >> 32) & 0xF_0000))
        return Segment(base: base, limit: limit, selector: selector,
                       type: UInt8((entry >> 40) & 0xF), present: (entry >> 47) & 1 == 1,
                       dpl: UInt8((entry >> 45) & 3), db: (entry >> 54) & 1 == 1,
                       s: (entry >> 44) & 1 == 1, l: (entry >> 53) & 1 == 1,
                       g: (entry >> 55) & 1 == 1, avl: (entry >> 52) & 1 == 1)
    }

    /// Writes the GDT and an empty IDT.
    public static func writeDescriptorTables(_ memory: GuestMemory) throws(GuestMemoryError) {
        for (i, entry) in gdt.enumerated() {
            try memory.write(entry, at: GuestAddress(Layout.gdtAddress.raw + UInt64(i * 8)))
        }
        try memory.write(UInt64(0), at: Layout.idtAddress)
    }

    // Page-table entry bits.
    static let present: UInt64 = 1 << 0
    static let writable: UInt64 = 1 << 1
    static let largePage: UInt64 = 1 << 7

    static let user: UInt64 = 1 << 2

    /// Identity-maps the first `Layout.identityMappedGiB` GiB with 2 MiB pages:
    /// the kernel's early code runs at its physical address until it builds its own tables.
    /// `userAccessible` sets the user bit on every entry, which a PVM host's native
    /// mode needs (the guest kernel runs in hardware ring 3; a present supervisor-only
    /// page livelocks the host's shadow MMU): only for a guest started in that mode.
    public static func writeIdentityPageTables(_ memory: GuestMemory, userAccessible: Bool = false) throws(GuestMemoryError) {
        let gib = Layout.identityMappedGiB
        let flags = present | writable | (userAccessible ? user : 0)
        try memory.fill(at: Layout.pml4Address, count: 4096)
        try memory.fill(at: Layout.pdptAddress, count: 4096)
        try memory.fill(at: Layout.pageDirectoryAddress, count: 4096 * gib)
        try memory.write(Layout.pdptAddress.raw | flags, at: Layout.pml4Address)
        for g in 0..<gib {
            let pd = Layout.pageDirectoryAddress.raw + g * 4096
            try memory.write(pd | flags, at: GuestAddress(Layout.pdptAddress.raw + g * 8))
            for i in 0..<UInt64(512) {
                let physical = (g << 30) | (i << 21)
                try memory.write(physical | flags | largePage, at: GuestAddress(pd + i * 8))
            }
        }
    }

    // Control-register and EFER bits for long mode with paging.
    public static let cr0ProtectionEnable: UInt64 = 1 << 0
    public static let cr0MonitorCoprocessor: UInt64 = 1 << 1
    public static let cr0ExtensionType: UInt64 = 1 << 4
    public static let cr0NumericError: UInt64 = 1 << 5
    public static let cr0Paging: UInt64 = 1 << 31
    public static let cr4PAE: UInt64 = 1 << 5
    public static let eferLME: UInt64 = 1 << 8
    public static let eferLMA: UInt64 = 1 << 10

    /// Segment and control registers for the 64-bit entry, on top of the vCPU's current ones.
    public static func longModeSpecialRegisters(_ base: SpecialRegisters) -> SpecialRegisters {
        var s = base
        let code = segment(from: gdt[1], selector: codeSelector)
        let data = segment(from: gdt[2], selector: dataSelector)
        let tss = segment(from: gdt[3], selector: tssSelector)
        s.cs = code
        s.ds = data; s.es = data; s.fs = data; s.gs = data; s.ss = data
        s.tr = tss
        s.gdt = DescriptorTable(base: Layout.gdtAddress.raw, limit: UInt16(gdt.count * 8 - 1))
        s.idt = DescriptorTable(base: Layout.idtAddress.raw, limit: 7)
        s.cr0 = cr0ProtectionEnable | cr0MonitorCoprocessor | cr0ExtensionType | cr0NumericError | cr0Paging
        s.cr3 = Layout.pml4Address.raw
        s.cr4 = cr4PAE
        s.efer = eferLME | eferLMA
        return s
    }

    /// General registers for the 64-bit entry: RIP at the kernel entry, RSI at the zero page.
    public static func entryRegisters(entry: GuestAddress) -> Registers {
        var r = Registers()
        r.rip = entry.raw
        r.rsi = Layout.zeroPageAddress.raw
        r.rsp = Layout.bootStackPointer
        r.rbp = Layout.bootStackPointer
        r.rflags = 0x2
        return r
    }

    // MSRs with the values a freshly reset CPU (or the firmware) leaves.
    public static func bootMSRs() -> [(index: UInt32, value: UInt64)] {
        [
            (0x174, 0), (0x175, 0), (0x176, 0),          // SYSENTER_CS/ESP/EIP
            (0xC000_0081, 0), (0xC000_0082, 0),           // STAR, LSTAR
            (0xC000_0083, 0), (0xC000_0084, 0),           // CSTAR, SFMASK
            (0xC000_0102, 0),                             // KERNEL_GS_BASE
            (0x10, 0),                                    // TSC
            (0x1A0, 1),                                   // MISC_ENABLE: fast strings, as firmware sets it
            (0x2FF, (1 << 11) | 6),                       // MTRRdefType: MTRRs on, default write-back
        ]
    }

    /// The CPUID the guest is offered: KVM's supported table, with this vCPU's
    /// APIC ID and the hypervisor bit, so the kernel finds kvm-clock.
    public static func guestCPUID(_ supported: CPUIDTable, vcpuID: UInt32, vcpuCount: UInt32) -> CPUIDTable {
        var t = supported
        t.modify(function: 1) { e in
            e.ebx = (e.ebx & 0x0000_FFFF) | (vcpuID << 24) | (max(vcpuCount, 1) << 16)
            e.ecx |= 1 << 31  // hypervisor present
        }
        t.modify(function: 0xB) { e in e.edx = vcpuID }   // x2APIC ID
        t.modify(function: 0x1F) { e in e.edx = vcpuID }
        return t
    }
}

extension CPUSetup {
    /// LVT LINT0 as ExtINT and LINT1 as NMI ("virtual wire" mode), as PC firmware
    /// leaves them, so the legacy PIC's interrupts (the UART's IRQ 4, the PIT)
    /// reach the CPU before Linux programs the APIC itself.
    public static func virtualWireLAPIC(_ regs: [UInt8]) -> [UInt8] {
        guard regs.count >= 0x370 else { return regs }
        var r = regs
        func update(_ offset: Int, deliveryMode: UInt32) {
            var v = UInt32(r[offset]) | UInt32(r[offset + 1]) << 8 | UInt32(r[offset + 2]) << 16 | UInt32(r[offset + 3]) << 24
            v = (v & ~0x700) | (deliveryMode << 8)
            v &= ~(1 << 16)  // unmask
            for i in 0..<4 { r[offset + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt32(i))) }
        }
        update(0x350, deliveryMode: 7)  // LINT0: ExtINT
        update(0x360, deliveryMode: 4)  // LINT1: NMI
        return r
    }
}
