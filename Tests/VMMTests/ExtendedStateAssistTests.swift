import GuestMemory
import KVM
import Testing
@testable import VMM

/// A guest with 4-level page tables built by hand: pages mapped one by one at any linear address.
final class PagedGuest {
    let memory: GuestMemory
    static let pml4: UInt64 = 0x1000
    private var nextTable: UInt64 = 0x2000
    init() throws { memory = try GuestMemory(layout: [(GuestAddress(0), 16 << 20)]) }

    /// Maps the 4 KiB page at `linear` to `physical` with `flags` (present is added).
    func map(_ linear: UInt64, to physical: UInt64, flags: UInt64 = 0x3) throws {
        var table = Self.pml4
        for level in stride(from: 4, to: 1, by: -1) {
            let slot = (linear >> UInt64(12 + 9 * (level - 1))) & 0x1FF
            let at = GuestAddress(table + slot * 8)
            var entry: UInt64 = try memory.read(at: at)
            if entry & 1 == 0 {
                entry = nextTable | 0x7  // present, writable, user: the leaf decides
                nextTable += 0x1000
                try memory.write(entry, at: at)
            }
            table = entry & 0x000F_FFFF_FFFF_F000
        }
        try memory.write(physical | flags | 1, at: GuestAddress(table + ((linear >> 12) & 0x1FF) * 8))
    }

    func pte(_ linear: UInt64) throws -> UInt64 {
        var table = Self.pml4
        for level in stride(from: 4, to: 1, by: -1) {
            let entry: UInt64 = try memory.read(at: GuestAddress(table + ((linear >> UInt64(12 + 9 * (level - 1))) & 0x1FF) * 8))
            table = entry & 0x000F_FFFF_FFFF_F000
        }
        return try memory.read(at: GuestAddress(table + ((linear >> 12) & 0x1FF) * 8))
    }

    /// Long mode with paging, CR0.WP, CR4.PAE and OSXSAVE.
    func sregs(cpl: UInt8 = 0) -> SpecialRegisters {
        var s = SpecialRegisters()
        s.cr0 = (1 << 31) | (1 << 16) | 1
        s.cr3 = Self.pml4
        s.cr4 = (1 << 5) | (1 << 18)
        s.efer = (1 << 8) | (1 << 10)
        s.cs.dpl = cpl
        return s
    }
}

@Suite struct ExtendedStateInstructionTests {
    typealias I = ExtendedStateInstruction

    @Test func linuxFormsDecode() {
        #expect(I.decode([0x48, 0x0F, 0xAE, 0x27]) == I(operation: .xsave, length: 4, memory: .init(base: 7)))
        #expect(I.decode([0x48, 0x0F, 0xAE, 0x2F])?.operation == .xrstor)
        #expect(I.decode([0x48, 0x0F, 0xAE, 0x37])?.operation == .xsaveopt)
    }

    @Test func everyAddressingFormDecodes() {
        // [rsp + 8]: SIB with no index, disp8.
        #expect(I.decode([0x48, 0x0F, 0xAE, 0x64, 0x24, 0x08])?.memory == .init(base: 4, displacement: 8))
        #expect(I.decode([0x48, 0x0F, 0xAE, 0x27, 0x90])?.length == 4)   // trailing bytes are the next instruction
        #expect(I.decode([0x48, 0x0F, 0xAE, 0x64, 0x24, 0x08])?.length == 6)
        // [rip + 0x10].
        let rip = I.decode([0x48, 0x0F, 0xAE, 0x25, 0x10, 0, 0, 0])
        #expect(rip?.memory == .init(displacement: 16, ripRelative: true) && rip?.length == 8)
        // gs:[rax], addr32 [rdi], [r13 - 0x80] (REX.B, disp8 negative).
        #expect(I.decode([0x65, 0x48, 0x0F, 0xAE, 0x20])?.memory == .init(base: 0, segment: .gs))
        #expect(I.decode([0x67, 0x48, 0x0F, 0xAE, 0x27])?.memory == .init(base: 7, addressSize32: true))
        #expect(I.decode([0x49, 0x0F, 0xAE, 0x65, 0x80])?.memory == .init(base: 13, displacement: -128))
        // [r8 * 8 + 0x1000]: REX.WX, SIB base 101b with mod 0 means disp32 and no base.
        #expect(I.decode([0x4A, 0x0F, 0xAE, 0x24, 0xC5, 0x00, 0x10, 0, 0])?.memory == .init(index: 8, scale: 8, displacement: 0x1000))
        // [rbx + rcx*2 + 0x12345678].
        #expect(I.decode([0x48, 0x0F, 0xAE, 0xA4, 0x4B, 0x78, 0x56, 0x34, 0x12])?.memory
                == .init(base: 3, index: 1, scale: 2, displacement: 0x1234_5678))
    }

    @Test func otherEncodingsAreNotCompleted() {
        #expect(I.decode([0x0F, 0xAE, 0x27]) == nil)               // 32-bit xsave: other x87 pointer layout
        #expect(I.decode([0xF0, 0x48, 0x0F, 0xAE, 0x27]) == nil)   // LOCK
        #expect(I.decode([0x66, 0x48, 0x0F, 0xAE, 0x27]) == nil)   // operand size
        #expect(I.decode([0x48, 0x0F, 0xAE, 0xE8]) == nil)         // register form (lfence)
        #expect(I.decode([0x48, 0x0F, 0xAE, 0x07]) == nil)         // fxsave: the emulator does it
        #expect(I.decode([0x48, 0x0F, 0xC7, 0x27]) == nil)         // xsavec
        #expect(I.decode([0x48, 0x0F, 0xAE, 0x64, 0x24]) == nil)   // cut short
        #expect(I.decode([0x48, 0x0F, 0xAE, 0xA4, 0x4B, 0x78]) == nil)
        #expect(I.decode([0x0F, 0x01, 0xF8]) == nil)               // swapgs
        #expect(I.decode([0x0F, 0x01, 0xD0]) == nil)               // xgetbv: Linux does not use it here
        #expect(I.decode([]) == nil && I.decode([0x48]) == nil && I.decode([0x0F]) == nil)
    }

    @Test func linearAddressAddsBaseIndexDisplacementAndSegment() {
        var r = Registers()
        r.rbx = 0x1000; r.rcx = 0x10; r.rip = 0x5000
        let op = ExtendedStateInstruction.MemoryOperand(base: 3, index: 1, scale: 4, displacement: -8, segment: .fs)
        #expect(op.linearAddress(regs: r, instructionLength: 5, fsBase: 0x100000, gsBase: 0) == 0x100000 + 0x1000 + 0x40 - 8)
        let rel = ExtendedStateInstruction.MemoryOperand(displacement: 0x20, ripRelative: true)
        #expect(rel.linearAddress(regs: r, instructionLength: 8, fsBase: 0, gsBase: 0) == 0x5000 + 8 + 0x20)
        r.rdi = 0xFFFF_FFFF_0000_1000
        let short = ExtendedStateInstruction.MemoryOperand(base: 7, addressSize32: true)
        #expect(short.linearAddress(regs: r, instructionLength: 5, fsBase: 0, gsBase: 0) == 0x1000)
    }
}

@Suite struct GuestPageWalkTests {
    @Test func translatesAndSetsAccessedAndDirty() throws {
        let g = try PagedGuest()
        try g.map(0x7000_0000_1000, to: 0x80_0000)
        let walk = GuestPageWalk(cr0: (1 << 31) | (1 << 16) | 1, cr3: PagedGuest.pml4, cr4: 1 << 5, efer: 1 << 10, cpl: 0)
        #expect(walk.translate(0x7000_0000_1234, access: .read, memory: g.memory) == .success(0x80_0234))
        #expect(try g.pte(0x7000_0000_1000) & (1 << 5) != 0)
        #expect(try g.pte(0x7000_0000_1000) & (1 << 6) == 0)
        _ = walk.translate(0x7000_0000_1234, access: .write, memory: g.memory)
        #expect(try g.pte(0x7000_0000_1000) & (1 << 6) != 0)
    }

    @Test func faultsCarryTheCPUsErrorCode() throws {
        let g = try PagedGuest()
        try g.map(0x40_0000, to: 0x80_0000, flags: 0x1)        // read-only, supervisor
        try g.map(0x40_1000, to: 0x80_1000, flags: 0x7)        // user, writable
        let kernel = GuestPageWalk(cr0: (1 << 31) | (1 << 16) | 1, cr3: PagedGuest.pml4, cr4: 1 << 5, efer: 1 << 10, cpl: 0)
        let user = GuestPageWalk(cr0: (1 << 31) | (1 << 16) | 1, cr3: PagedGuest.pml4, cr4: 1 << 5, efer: 1 << 10, cpl: 3)
        // Not present: P = 0.
        #expect(kernel.translate(0x50_0000, access: .write, memory: g.memory) == .failure(.pageFault(address: 0x50_0000, errorCode: 0x2)))
        #expect(user.translate(0x50_0008, access: .read, memory: g.memory) == .failure(.pageFault(address: 0x50_0008, errorCode: 0x4)))
        // Write to read-only with CR0.WP: P | W.
        #expect(kernel.translate(0x40_0010, access: .write, memory: g.memory) == .failure(.pageFault(address: 0x40_0010, errorCode: 0x3)))
        // User touching a supervisor page: P | U.
        #expect(user.translate(0x40_0010, access: .read, memory: g.memory) == .failure(.pageFault(address: 0x40_0010, errorCode: 0x5)))
        #expect(user.translate(0x40_1010, access: .write, memory: g.memory) == .success(0x80_1010))
        // SMAP: the kernel touching a user page faults unless RFLAGS.AC is set.
        let smap = GuestPageWalk(cr0: (1 << 31) | 1, cr3: PagedGuest.pml4, cr4: (1 << 5) | (1 << 21), efer: 1 << 10, cpl: 0)
        #expect(smap.translate(0x40_1010, access: .read, memory: g.memory) == .failure(.pageFault(address: 0x40_1010, errorCode: 0x1)))
        let ac = GuestPageWalk(cr0: (1 << 31) | 1, cr3: PagedGuest.pml4, cr4: (1 << 5) | (1 << 21), efer: 1 << 10, cpl: 0, alignmentCheck: true)
        #expect(ac.translate(0x40_1010, access: .read, memory: g.memory) == .success(0x80_1010))
        // Non-canonical: #GP.
        #expect(kernel.translate(0x0000_8000_0000_0000, access: .read, memory: g.memory) == .failure(.generalProtection))
    }

    @Test func largePagesAndTablesOutsideRAM() throws {
        let g = try PagedGuest()
        // A 2 MiB page: PD entry with PS.
        try g.map(0x20_0000, to: 0x0)   // builds the tables; replace the PD entry by a large page
        let pml4e: UInt64 = try g.memory.read(at: GuestAddress(PagedGuest.pml4))
        let pdpte: UInt64 = try g.memory.read(at: GuestAddress(pml4e & ~0xFFF))
        let pd = pdpte & ~0xFFF
        try g.memory.write(UInt64(0x60_0000) | 0x83, at: GuestAddress(pd + 1 * 8))
        let walk = GuestPageWalk(cr0: (1 << 31) | 1, cr3: PagedGuest.pml4, cr4: 1 << 5, efer: 1 << 10, cpl: 0)
        #expect(walk.translate(0x3F_FFF8, access: .read, memory: g.memory) == .success(0x7F_FFF8))
        // A PD entry pointing at a table beyond RAM: reserved-bit fault, no host access.
        try g.memory.write(UInt64(0x40_0000_0000) | 0x3, at: GuestAddress(pd + 2 * 8))
        #expect(walk.translate(0x40_0000, access: .read, memory: g.memory) == .failure(.pageFault(address: 0x40_0000, errorCode: 0x9)))
        let noPaging = GuestPageWalk(cr0: 1, cr3: 0, cr4: 0, efer: 0, cpl: 0)
        guard case .failure(.unsupportedMode) = noPaging.translate(0, access: .read, memory: g.memory) else {
            Issue.record("paging off must be refused"); return
        }
    }
}

@Suite struct ExtendedStateAssistTests {
    /// x87/SSE, AVX at 576 (256 bytes), and PKRU at 2688 (8 bytes), as on the host CPU.
    static let layout = XSaveLayout(components: [2: (576, 256), 9: (2688, 8)])
    static let sizeOfArea = 2696
    static let buffer: UInt64 = 0x7FFF_0000_0FC0  // 64-byte aligned, the area crosses into the next page

    func setUp(xcr0: UInt64 = 0x207) throws -> (PagedGuest, FakeVCPU, ExtendedStateAssist) {
        let g = try PagedGuest()
        try g.map(Self.buffer & ~0xFFF, to: 0x10_0000)
        try g.map((Self.buffer & ~0xFFF) + 0x1000, to: 0x20_0000)
        let v = FakeVCPU()
        v.sregs = g.sregs()
        v.xcr0Value = xcr0
        for i in 0..<v.xsave.count { v.xsave[i] = UInt8(truncatingIfNeeded: i &* 7 &+ 1) }
        ExtendedStateAssist.store64(0x207, into: &v.xsave, at: 512)
        ExtendedStateAssist.store32(0xFFFF, into: &v.xsave, at: 28)   // MXCSR_MASK
        ExtendedStateAssist.store32(0x1F80, into: &v.xsave, at: 24)
        v.regs.rdi = Self.buffer
        v.regs.rip = 0x1000
        return (g, v, ExtendedStateAssist(memory: g.memory, layout: Self.layout))
    }

    /// The guest's view of the save area at `buffer`.
    func area(_ g: PagedGuest, count: Int = 2696) throws -> [UInt8] {
        let first = 0x1000 - Int(Self.buffer & 0xFFF)
        return try g.memory.readBytes(at: GuestAddress(0x10_0000 + (Self.buffer & 0xFFF)), count: first)
            + g.memory.readBytes(at: GuestAddress(0x20_0000), count: count - first)
    }

    func writeArea(_ g: PagedGuest, _ bytes: [UInt8]) throws {
        let first = 0x1000 - Int(Self.buffer & 0xFFF)
        try g.memory.write(Array(bytes[0..<first]), at: GuestAddress(0x10_0000 + (Self.buffer & 0xFFF)))
        try g.memory.write(Array(bytes[first...]), at: GuestAddress(0x20_0000))
    }

    let xsave = ExtendedStateInstruction.decode([0x48, 0x0F, 0xAE, 0x27])!
    let xrstor = ExtendedStateInstruction.decode([0x48, 0x0F, 0xAE, 0x2F])!

    @Test func xsaveCopiesTheRequestedComponentsAndLeavesTheRest() throws {
        let (g, v, assist) = try setUp()
        try writeArea(g, [UInt8](repeating: 0xEE, count: 2696))
        v.regs.rax = 0x7; v.regs.rdx = 0   // x87, SSE, AVX; not PKRU
        #expect(try assist.complete(xsave, vcpu: v) == .completed)
        #expect(v.regs.rip == 0x1004)
        let a = try area(g)
        #expect(Array(a[0..<416]) == Array(v.xsave[0..<416]))          // x87, MXCSR, XMM
        #expect(a[416..<512].allSatisfy { $0 == 0xEE })                   // reserved and software bytes
        #expect(ExtendedStateAssist.load64(a, at: 512) == (UInt64(0xEEEE_EEEE_EEEE_EEEE) & ~UInt64(0x7)) | 0x7)
        #expect(a[520..<576].allSatisfy { $0 == 0xEE })                   // rest of the header
        #expect(Array(a[576..<832]) == Array(v.xsave[576..<832]))        // AVX
        #expect(a[2688..<2696].allSatisfy { $0 == 0xEE })                 // PKRU not requested
    }

    @Test func xsaveOfX87AloneLeavesSSEAndMXCSR() throws {
        let (g, v, assist) = try setUp()
        try writeArea(g, [UInt8](repeating: 0xEE, count: 2696))
        v.regs.rax = 0x1
        #expect(try assist.complete(xsave, vcpu: v) == .completed)
        let a = try area(g)
        #expect(Array(a[0..<24]) == Array(v.xsave[0..<24]) && Array(a[32..<160]) == Array(v.xsave[32..<160]))
        #expect(a[24..<32].allSatisfy { $0 == 0xEE } && a[160..<416].allSatisfy { $0 == 0xEE })
    }

    @Test func requestsBeyondXCR0AreIgnoredAsTheCPUDoes() throws {
        let (g, v, assist) = try setUp(xcr0: 0x3)
        try writeArea(g, [UInt8](repeating: 0xEE, count: 2696))
        v.regs.rax = 0xFFFF_FFFF; v.regs.rdx = 0xFFFF_FFFF
        #expect(try assist.complete(xsave, vcpu: v) == .completed)
        #expect(try area(g)[576..<832].allSatisfy { $0 == 0xEE })
    }

    @Test func faultsLeaveMemoryAndRIPAlone() throws {
        let (g, v, assist) = try setUp()
        try writeArea(g, [UInt8](repeating: 0xEE, count: 2696))
        v.regs.rax = 0x207
        // Misaligned: #GP(0).
        v.regs.rdi = Self.buffer + 8
        #expect(try assist.complete(xsave, vcpu: v) == .raised(vector: 13, errorCode: 0))
        // The second page unmapped: #PF for its first byte, nothing written to the first page.
        v.regs.rdi = Self.buffer
        try g.memory.write(UInt64(0), at: GuestAddress(try pteAddress(g, (Self.buffer & ~0xFFF) + 0x1000)))
        #expect(try assist.complete(xsave, vcpu: v) == .raised(vector: 14, errorCode: 0x2))
        #expect(v.sregs.cr2 == (Self.buffer & ~0xFFF) + 0x1000)
        #expect(try g.memory.readBytes(at: GuestAddress(0x10_0000 + 0xFC0), count: 64).allSatisfy { $0 == 0xEE })
        #expect(v.regs.rip == 0x1000)
        // OSXSAVE off: #UD. CR0.TS: #NM.
        v.sregs.cr4 &= ~(1 << 18)
        #expect(try assist.complete(xsave, vcpu: v) == .raised(vector: 6, errorCode: nil))
        v.sregs = g.sregs()
        v.sregs.cr0 |= 1 << 3
        #expect(try assist.complete(xrstor, vcpu: v) == .raised(vector: 7, errorCode: nil))
        #expect(v.injected == [13, 14, 6, 7])
    }

    func pteAddress(_ g: PagedGuest, _ linear: UInt64) throws -> UInt64 {
        var table = PagedGuest.pml4
        for level in stride(from: 4, to: 1, by: -1) {
            let entry: UInt64 = try g.memory.read(at: GuestAddress(table + ((linear >> UInt64(12 + 9 * (level - 1))) & 0x1FF) * 8))
            table = entry & 0x000F_FFFF_FFFF_F000
        }
        return table + ((linear >> 12) & 0x1FF) * 8
    }

    @Test func xrstorLoadsSavedComponentsAndInitialisesTheOthers() throws {
        let (g, v, assist) = try setUp()
        var saved = [UInt8](repeating: 0, count: 2696)
        for i in 0..<saved.count { saved[i] = UInt8(truncatingIfNeeded: i &* 13 &+ 5) }
        ExtendedStateAssist.store32(0x1FA0, into: &saved, at: 24)         // a valid MXCSR
        ExtendedStateAssist.store64(0x5, into: &saved, at: 512)          // x87 and AVX in use, SSE at init
        for o in 520..<576 { saved[o] = 0 }
        try writeArea(g, saved)
        let before = v.xsave
        v.regs.rax = 0x7
        #expect(try assist.complete(xrstor, vcpu: v) == .completed)
        let s = v.xsave
        #expect(Array(s[0..<24]) == Array(saved[0..<24]) && Array(s[32..<160]) == Array(saved[32..<160]))
        #expect(s[160..<416].allSatisfy { $0 == 0 })                       // SSE: its initial state
        #expect(ExtendedStateAssist.load32(s, at: 24) == 0x1FA0)           // MXCSR with AVX's state
        #expect(Array(s[576..<832]) == Array(saved[576..<832]))
        #expect(Array(s[2688..<2696]) == Array(before[2688..<2696]))     // PKRU outside RFBM: kept
        #expect(ExtendedStateAssist.load64(s, at: 512) & 0x7 == 0x7)
        #expect(v.regs.rip == 0x1004)
    }

    @Test func xrstorInitialisesX87WhenNotSaved() throws {
        let (g, v, assist) = try setUp()
        var saved = [UInt8](repeating: 0x55, count: 2696)
        for o in 512..<576 { saved[o] = 0 }
        try writeArea(g, saved)
        v.regs.rax = 0x1
        #expect(try assist.complete(xrstor, vcpu: v) == .completed)
        #expect(ExtendedStateAssist.load16(v.xsave, at: 0) == 0x037F)
        #expect(v.xsave[2..<24].allSatisfy { $0 == 0 } && v.xsave[32..<160].allSatisfy { $0 == 0 })
    }

    @Test func xrstorRefusesWhatTheCPURefuses() throws {
        let (g, v, assist) = try setUp()
        var saved = [UInt8](repeating: 0, count: 2696)
        ExtendedStateAssist.store32(0x1F80, into: &saved, at: 24)
        v.regs.rax = 0x7
        func attempt(_ patch: (inout [UInt8]) -> Void) throws -> ExtendedStateAssist.Outcome {
            var a = saved
            patch(&a)
            try writeArea(g, a)
            return try assist.complete(xrstor, vcpu: v)
        }
        #expect(try attempt { ExtendedStateAssist.store64(1 << 63 | 0x7, into: &$0, at: 520) } == .raised(vector: 13, errorCode: 0))  // compacted
        #expect(try attempt { $0[530] = 1 } == .raised(vector: 13, errorCode: 0))                                                  // reserved header bytes
        #expect(try attempt { ExtendedStateAssist.store64(0x20, into: &$0, at: 512) } == .raised(vector: 13, errorCode: 0))     // not in XCR0
        #expect(try attempt { ExtendedStateAssist.store64(0x2, into: &$0, at: 512); ExtendedStateAssist.store32(0x1_0000, into: &$0, at: 24) }
                == .raised(vector: 13, errorCode: 0))                                                                            // MXCSR reserved bit
        v.refuseXSAVE = true
        #expect(try attempt { ExtendedStateAssist.store64(0x3, into: &$0, at: 512) } == .raised(vector: 13, errorCode: 0))
        #expect(v.regs.rip == 0x1000)
    }

    @Test func exitHandlerCompletesAnEmulationFailureAndRefusesOthers() throws {
        let (_, v, assist) = try setUp()
        v.regs.rax = 0x3
        let h = ExitHandler(portBus: Bus(name: "p"), mmioBus: Bus(name: "m"), emulationAssists: true, extendedState: assist)
        // data[1]: length 4, then the bytes of xsave64 (%rdi).
        let words: [UInt64] = [0, 0x27AE_0F48_04, 0]
        var none: [UInt8] = []
        let action = try none.withUnsafeMutableBytes { try h.handle(.internalError(suberror: 1, data: words), data: $0, vcpu: v) }
        #expect(action == .resume && v.regs.rip == 0x1004)
        // The 32-bit form is not completed: the run stops with the instruction's bytes.
        #expect(throws: VMMError.self) {
            try none.withUnsafeMutableBytes { try h.handle(.internalError(suberror: 1, data: [0, 0x27AE_0F03, 0]), data: $0, vcpu: v) }
        }
    }
}
