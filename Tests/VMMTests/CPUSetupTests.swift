import GuestMemory
import KVM
import Testing
@testable import VMM

@Suite struct CPUSetupTests {
    @Test func gdtEntriesMatchTheLongModeDescriptors() {
        // The values every 64-bit boot uses: code 0x00AF9B..., data 0x00CF93..., TSS 0x008F8B...
        #expect(CPUSetup.gdt == [0, 0x00AF_9B00_0000_FFFF, 0x00CF_9300_0000_FFFF, 0x008F_8B00_0000_FFFF])
    }

    @Test func gdtEntryEncodesBaseAndLimitFields() {
        let e = CPUSetup.gdtEntry(flags: 0xC093, base: 0x1234_5678, limit: 0xABCDE)
        #expect(e & 0xFFFF == 0xBCDE)                       // limit 15:0
        #expect((e >> 16) & 0xFF_FFFF == 0x34_5678)          // base 23:0
        #expect((e >> 40) & 0xFF == 0x93)                    // access byte
        #expect((e >> 48) & 0xF == 0xA)                      // limit 19:16
        #expect((e >> 52) & 0xF == 0xC)                      // G, D/B
        #expect((e >> 56) & 0xFF == 0x12)                    // base 31:24
    }

    @Test func segmentsDecodeFromTheGDT() {
        let cs = CPUSetup.segment(from: CPUSetup.gdt[1], selector: 8)
        #expect(cs.l && cs.present && cs.s && cs.g && !cs.db && cs.type == 0xB && cs.dpl == 0 && cs.limit == 0xFFFFF)
        let ds = CPUSetup.segment(from: CPUSetup.gdt[2], selector: 0x10)
        #expect(!ds.l && ds.db && ds.type == 3 && ds.present)
        let tr = CPUSetup.segment(from: CPUSetup.gdt[3], selector: 0x18)
        #expect(!tr.s && tr.type == 0xB && tr.present)
    }

    @Test func descriptorTablesAreWrittenWhereTheRegistersPoint() throws {
        let memory = try GuestMemory(layout: [(GuestAddress(0), 32 << 20)])
        try CPUSetup.writeDescriptorTables(memory)
        for (i, entry) in CPUSetup.gdt.enumerated() {
            #expect(try memory.read(UInt64.self, at: GuestAddress(0x500 + UInt64(i) * 8)) == entry)
        }
        let s = CPUSetup.longModeSpecialRegisters(SpecialRegisters())
        #expect(s.gdt == DescriptorTable(base: 0x500, limit: 31))
        #expect(s.idt.base == 0x520)
        #expect(s.cs.selector == 8 && s.ds.selector == 0x10 && s.ss.selector == 0x10 && s.tr.selector == 0x18)
        #expect(s.cr0 & 0x8000_0001 == 0x8000_0001)  // PG and PE
        #expect(s.cr4 & 0x20 != 0)                   // PAE
        #expect(s.efer == 0x500)                     // LME | LMA
        #expect(s.cr3 == 0x9000)
    }

    @Test func pageTablesIdentityMapFourGiBWithLargePages() throws {
        let memory = try GuestMemory(layout: [(GuestAddress(0), 32 << 20)])
        try CPUSetup.writeIdentityPageTables(memory)
        #expect(try memory.read(UInt64.self, at: GuestAddress(0x9000)) == 0xA003)
        #expect(try memory.read(UInt64.self, at: GuestAddress(0x9008)) == 0)
        for g in 0..<UInt64(4) {
            #expect(try memory.read(UInt64.self, at: GuestAddress(0xA000 + g * 8)) == (0xB000 + g * 0x1000) | 3)
        }
        #expect(try memory.read(UInt64.self, at: GuestAddress(0xA020)) == 0)
        // A virtual address translates to itself: walk the tables for a few.
        for va: UInt64 in [0, 0x1000000, 0x7FE0_0000, 0xFFE0_0000] {
            let pdpte = try memory.read(UInt64.self, at: GuestAddress(0xA000 + ((va >> 30) & 511) * 8))
            let pde = try memory.read(UInt64.self, at: GuestAddress((pdpte & ~0xFFF) + ((va >> 21) & 511) * 8))
            #expect(pde & 0x83 == 0x83)
            #expect(pde & ~0xFFF & ~UInt64(0x80) == va)
        }
    }

    @Test func nativeModePageTablesCarryTheUserBitEverywhere() throws {
        let memory = try GuestMemory(layout: [(GuestAddress(0), 32 << 20)])
        try CPUSetup.writeIdentityPageTables(memory, userAccessible: true)
        #expect(try memory.read(UInt64.self, at: GuestAddress(0x9000)) == 0xA007)
        for g in 0..<UInt64(4) {
            #expect(try memory.read(UInt64.self, at: GuestAddress(0xA000 + g * 8)) == (0xB000 + g * 0x1000) | 7)
            for i in 0..<UInt64(512) {
                let pde = try memory.read(UInt64.self, at: GuestAddress(0xB000 + g * 0x1000 + i * 8))
                #expect(pde == (g << 30 | i << 21) | 0x87)
            }
        }
        // Written again without it (the host refused the VIF page): no user bit is left.
        try CPUSetup.writeIdentityPageTables(memory)
        #expect(try memory.read(UInt64.self, at: GuestAddress(0xB008)) & 4 == 0)
        #expect(try memory.read(UInt64.self, at: GuestAddress(0x9000)) & 4 == 0)
    }

    @Test func entryRegistersPointAtTheKernelAndTheZeroPage() {
        let r = CPUSetup.entryRegisters(entry: GuestAddress(0x100_0000))
        #expect(r.rip == 0x100_0000 && r.rsi == 0x7000 && r.rflags == 2 && r.rsp == Layout.bootStackPointer)
    }

    @Test func guestCPUIDSetsTheHypervisorBitAndAPICID() {
        let t = CPUIDTable(entries: [CPUIDEntry(function: 0), CPUIDEntry(function: 1, ebx: 0xFF00_1234, ecx: 0x1)])
        let g = CPUSetup.guestCPUID(t, vcpuID: 3, vcpuCount: 4)
        let leaf1 = g.entries[1]
        #expect(leaf1.ecx == 0x8000_0001)
        #expect(leaf1.ebx >> 24 == 3 && (leaf1.ebx >> 16) & 0xFF == 4 && leaf1.ebx & 0xFFFF == 0x1234)
    }

    @Test func lapicVirtualWireUnmasksLINT0AsExtINTAndLINT1AsNMI() {
        var regs = [UInt8](repeating: 0, count: 1024)
        regs[0x352] = 0x01  // masked (bit 16)
        regs[0x362] = 0x01
        let r = CPUSetup.virtualWireLAPIC(regs)
        #expect(r[0x351] == 0x07 && r[0x352] == 0)
        #expect(r[0x361] == 0x04 && r[0x362] == 0)
    }

    @Test func ramSkipsTheMMIOWindow() {
        #expect(Layout.ramRegions(memory: 256 << 20).map(\.size) == [256 << 20])
        let big = Layout.ramRegions(memory: 4 << 30)
        #expect(big.count == 2 && big[0].size == 0xC000_0000 && big[1].start.raw == 1 << 32 && big[1].size == (4 << 30) - 0xC000_0000)
    }
}
