import GuestMemory
import KVM

/// Where each state component lives in the standard (non-compacted) XSAVE layout: the
/// offsets and sizes CPUID leaf 0xD reports, which KVM's XSAVE buffer uses too.
public struct XSaveLayout: Equatable, Sendable {
    /// Component i (2...62) -> (offset, size) in bytes from the area's start.
    public let components: [Int: (offset: Int, size: Int)]

    public static func == (a: XSaveLayout, b: XSaveLayout) -> Bool {
        a.components.count == b.components.count
            && a.components.allSatisfy { k, v in b.components[k].map { $0 == v } ?? false }
    }

    /// The x87 and SSE parts of the 512-byte legacy region, and the header after it.
    static let x87Ranges = [0..<24, 32..<160]
    static let sseRange = 160..<416
    static let mxcsrRange = 24..<32
    static let headerStart = 512, headerSize = 64
    static let x87 = 1 << 0, sse = 1 << 1, avx = 1 << 2

    public init(components: [Int: (offset: Int, size: Int)]) { self.components = components }

    /// From the CPUID table's leaf 0xD sub-leaves (EAX = size, EBX = offset; supervisor
    /// components, ECX bit 0, have no standard-format offset and are left out).
    public init(cpuid: CPUIDTable) {
        var c: [Int: (offset: Int, size: Int)] = [:]
        for e in cpuid.entries where e.function == 0xD && e.index >= 2 && e.index < 63 && e.ecx & 1 == 0 && e.eax > 0 {
            c[Int(e.index)] = (Int(e.ebx), Int(e.eax))
        }
        components = c
    }

    /// Bytes from the area's start that an access with `rfbm` covers (legacy region and header always).
    func extent(rfbm: UInt64) -> Int {
        var end = Self.headerStart + Self.headerSize
        for (i, c) in components where rfbm & (1 << UInt64(i)) != 0 { end = max(end, c.offset + c.size) }
        return end
    }

    /// Whether every component in `mask` beyond x87/SSE has a known place.
    func covers(_ mask: UInt64) -> Bool {
        (2..<63).allSatisfy { i in mask & (1 << UInt64(i)) == 0 || components[i] != nil }
    }
}

/// What completing an extended-state instruction needs from a vCPU (`VCPU` through KVM;
/// tests use a fake).
public protocol ExtendedStateVCPU: AnyObject {
    func registers() throws(KVMError) -> Registers
    func setRegisters(_ regs: Registers) throws(KVMError)
    func injectException(vector: UInt8) throws(KVMError)
    func specialRegisters() throws(KVMError) -> SpecialRegisters
    func injectPageFault(address: UInt64, errorCode: UInt32) throws(KVMError)
    func xsaveArea() throws(KVMError) -> [UInt8]
    func setXSAVEArea(_ area: [UInt8]) throws(KVMError)
    func xcr0() throws(KVMError) -> UInt64
    func injectException(vector: UInt8, errorCode: UInt32) throws(KVMError)
}

/// Completes XSAVE, XSAVEOPT and XRSTOR for a guest kernel whose own code runs in KVM's
/// instruction emulator, which rejects them (PVM hosts).
///
/// Why: guest user code runs on the hardware with the host's XCR0 (AVX, AVX-512, ...), so
/// the guest kernel must save and restore all of that state on every context switch or
/// processes see each other's registers. With XSAVE off (`noxsave`) it saves only the
/// legacy FPU/SSE state. So the guest kernel uses XSAVE in its plain standard-format form
/// (the host profile clears XSAVEOPT/XSAVEC/XSAVES/XGETBV1 so it never picks the others),
/// and each use arrives here as an emulation failure. The state itself is the vCPU's:
/// KVM_GET_XSAVE2 holds exactly the registers guest user code left, in the same standard
/// layout, so an XSAVE copies the requested components between it and guest memory and an
/// XRSTOR copies them back, with the architectural checks, faults and init semantics.
///
/// Everything the guest controls (the address, the area's header, MXCSR, the page tables)
/// is checked: a bad value becomes the exception the CPU would raise, delivered to the
/// guest, never a host access outside guest RAM.
public struct ExtendedStateAssist: Sendable {
    public let memory: GuestMemory
    public let layout: XSaveLayout

    public init(memory: GuestMemory, layout: XSaveLayout) {
        self.memory = memory
        self.layout = layout
    }

    /// What happened to the instruction.
    public enum Outcome: Equatable, Sendable {
        /// It ran; RIP is past it.
        case completed
        /// It raised `vector` (with `errorCode`), now queued for the guest; RIP is unchanged.
        case raised(vector: UInt8, errorCode: UInt32?)
    }

    static let ud: UInt8 = 6, nm: UInt8 = 7, gp: UInt8 = 13, pf: UInt8 = 14
    /// An exception to raise instead, with CR2 for a page fault.
    private typealias Fault = (vector: UInt8, errorCode: UInt32?, cr2: UInt64?)

    /// Completes `instruction` at the vCPU's RIP.
    public func complete(_ instruction: ExtendedStateInstruction, vcpu: some ExtendedStateVCPU) throws(ExtendedStateError) -> Outcome {
        let regs = try kvm { () throws(KVMError) in try vcpu.registers() }
        let sregs = try kvm { () throws(KVMError) in try vcpu.specialRegisters() }

        var fault: Fault?
        if sregs.cr4 & (1 << 18) == 0 {
            fault = (Self.ud, nil, nil)  // CR4.OSXSAVE off
        } else if sregs.cr0 & (1 << 3) != 0 {
            fault = (Self.nm, nil, nil)  // CR0.TS
        } else {
            let address = instruction.memory.linearAddress(regs: regs, instructionLength: instruction.length,
                                                           fsBase: sregs.fs.base, gsBase: sregs.gs.base)
            let xcr0 = try kvm { () throws(KVMError) in try vcpu.xcr0() }
            let rfbm = ((regs.rdx & 0xFFFF_FFFF) << 32 | (regs.rax & 0xFFFF_FFFF)) & xcr0
            guard layout.covers(rfbm) else {
                throw .unsupported("XCR0 component mask 0x\(String(rfbm, radix: 16)) has components without a known layout")
            }
            let walk = GuestPageWalk(cr0: sregs.cr0, cr3: sregs.cr3, cr4: sregs.cr4, efer: sregs.efer,
                                     cpl: sregs.cs.dpl, alignmentCheck: regs.rflags & (1 << 18) != 0)
            if address % 64 != 0 {
                fault = (Self.gp, 0, nil)
            } else if instruction.operation == .xrstor {
                fault = try restore(from: address, rfbm: rfbm, xcr0: xcr0, walk: walk, vcpu: vcpu)
            } else {
                fault = try save(to: address, rfbm: rfbm, walk: walk, vcpu: vcpu)
            }
        }

        if let fault {
            if let cr2 = fault.cr2, let code = fault.errorCode {
                try kvm { () throws(KVMError) in try vcpu.injectPageFault(address: cr2, errorCode: code) }
            } else if let code = fault.errorCode {
                try kvm { () throws(KVMError) in try vcpu.injectException(vector: fault.vector, errorCode: code) }
            } else {
                try kvm { () throws(KVMError) in try vcpu.injectException(vector: fault.vector) }
            }
            return .raised(vector: fault.vector, errorCode: fault.errorCode)
        }
        var newRegs = regs
        newRegs.rip &+= UInt64(instruction.length)
        try kvm { () throws(KVMError) in try vcpu.setRegisters(newRegs) }
        return .completed
    }

    // MARK: - XSAVE and XRSTOR

    /// The guest-physical pages behind `[address, address + count)`, or the fault the access raises.
    /// Every page is translated before any byte moves, so a fault leaves memory untouched.
    private func pages(_ address: UInt64, count: Int, access: GuestPageWalk.Access,
                       walk: GuestPageWalk) -> Result<[(physical: UInt64, offset: Int, length: Int)], GuestPageWalk.Fault> {
        var pieces: [(physical: UInt64, offset: Int, length: Int)] = []
        var done = 0
        while done < count {
            let linear = address &+ UInt64(done)
            let inPage = Int(4096 - (linear & 4095))
            let length = min(inPage, count - done)
            switch walk.translate(linear, access: access, memory: memory) {
            case let .success(physical): pieces.append((physical, done, length))
            case let .failure(f): return .failure(f)
            }
            done += length
        }
        return .success(pieces)
    }

    private func fault(_ f: GuestPageWalk.Fault) throws(ExtendedStateError) -> Fault {
        switch f {
        case let .pageFault(address, code): return (Self.pf, code, address)
        case .generalProtection: return (Self.gp, 0, nil)
        case let .unsupportedMode(why): throw .unsupported(why)
        }
    }

    /// Reads guest bytes through translated pages; a page outside RAM reads as #GP.
    private func read(_ pieces: [(physical: UInt64, offset: Int, length: Int)], count: Int) -> [UInt8]? {
        var bytes = [UInt8](repeating: 0, count: count)
        for p in pieces {
            let ok: Bool = bytes.withUnsafeMutableBytes { buf in
                (try? memory.read(at: GuestAddress(p.physical), into: UnsafeMutableRawBufferPointer(rebasing: buf[p.offset..<(p.offset + p.length)]))) != nil
            }
            if !ok { return nil }
        }
        return bytes
    }

    private func save(to address: UInt64, rfbm: UInt64, walk: GuestPageWalk, vcpu: some ExtendedStateVCPU) throws(ExtendedStateError) -> Fault? {
        let count = layout.extent(rfbm: rfbm)
        let pieces: [(physical: UInt64, offset: Int, length: Int)]
        switch self.pages(address, count: count, access: .write, walk: walk) {
        case let .success(p): pieces = p
        case let .failure(f): return try fault(f)
        }
        // Start from the guest's own bytes: XSAVE leaves bytes 416-511, the header after
        // XSTATE_BV and components outside RFBM as they were.
        guard var area = read(pieces, count: count) else { return (Self.gp, 0, nil) }
        let state = try kvm { () throws(KVMError) in try vcpu.xsaveArea() }
        guard state.count >= count else { throw .unsupported("the vCPU's XSAVE buffer (\(state.count) bytes) is smaller than the area (\(count))") }
        func copy(_ r: Range<Int>) { area.replaceSubrange(r, with: state[r]) }
        if rfbm & UInt64(XSaveLayout.x87) != 0 { XSaveLayout.x87Ranges.forEach(copy) }
        if rfbm & UInt64(XSaveLayout.sse) != 0 { copy(XSaveLayout.sseRange) }
        if rfbm & UInt64(XSaveLayout.sse | XSaveLayout.avx) != 0 { copy(XSaveLayout.mxcsrRange) }
        for (i, c) in layout.components where rfbm & (1 << UInt64(i)) != 0 { copy(c.offset..<(c.offset + c.size)) }
        let oldBV = Self.load64(area, at: XSaveLayout.headerStart)
        let inUse = Self.load64(state, at: XSaveLayout.headerStart)
        Self.store64((oldBV & ~rfbm) | (inUse & rfbm), into: &area, at: XSaveLayout.headerStart)
        for p in pieces {
            let ok: Bool = area.withUnsafeBytes { buf in
                (try? memory.write(at: GuestAddress(p.physical), from: UnsafeRawBufferPointer(rebasing: buf[p.offset..<(p.offset + p.length)]))) != nil
            }
            if !ok { return (Self.gp, 0, nil) }
        }
        return nil
    }

    private func restore(from address: UInt64, rfbm: UInt64, xcr0: UInt64, walk: GuestPageWalk, vcpu: some ExtendedStateVCPU) throws(ExtendedStateError) -> Fault? {
        let count = layout.extent(rfbm: rfbm)
        let pieces: [(physical: UInt64, offset: Int, length: Int)]
        switch self.pages(address, count: count, access: .read, walk: walk) {
        case let .success(p): pieces = p
        case let .failure(f): return try fault(f)
        }
        guard let area = read(pieces, count: count) else { return (Self.gp, 0, nil) }
        let xstateBV = Self.load64(area, at: XSaveLayout.headerStart)
        // The standard form: no compaction (XCOMP_BV) and the next 8 header bytes zero,
        // and no component the guest did not enable.
        let xcompBV = Self.load64(area, at: XSaveLayout.headerStart + 8)
        let reserved = Self.load64(area, at: XSaveLayout.headerStart + 16)
        if xcompBV != 0 || reserved != 0 || xstateBV & ~xcr0 != 0 { return (Self.gp, 0, nil) }

        var state = try kvm { () throws(KVMError) in try vcpu.xsaveArea() }
        guard state.count >= count else { throw .unsupported("the vCPU's XSAVE buffer (\(state.count) bytes) is smaller than the area (\(count))") }
        let sseOrAVX = UInt64(XSaveLayout.sse | XSaveLayout.avx)
        if rfbm & sseOrAVX != 0 {
            // MXCSR comes from memory when SSE or AVX state is loaded, and must fit MXCSR_MASK.
            let mxcsrMask = Self.load32(state, at: 28) == 0 ? 0xFFBF : Self.load32(state, at: 28)
            let loaded = xstateBV & rfbm & sseOrAVX != 0
            let mxcsr = loaded ? Self.load32(area, at: 24) : 0x1F80
            if mxcsr & ~mxcsrMask != 0 { return (Self.gp, 0, nil) }
            Self.store32(mxcsr, into: &state, at: 24)
        }
        // Each requested component: from memory when XSTATE_BV says it was saved in use,
        // otherwise its initial configuration. Written into KVM's buffer with its bit set,
        // so KVM loads exactly these values.
        func load(_ r: Range<Int>, fromGuest: Bool) {
            if fromGuest { state.replaceSubrange(r, with: area[r]) } else { state.replaceSubrange(r, with: repeatElement(0, count: r.count)) }
        }
        if rfbm & UInt64(XSaveLayout.x87) != 0 {
            let fromGuest = xstateBV & UInt64(XSaveLayout.x87) != 0
            XSaveLayout.x87Ranges.forEach { load($0, fromGuest: fromGuest) }
            if !fromGuest { Self.store16(0x037F, into: &state, at: 0) }  // FCW's initial value
        }
        if rfbm & UInt64(XSaveLayout.sse) != 0 { load(XSaveLayout.sseRange, fromGuest: xstateBV & UInt64(XSaveLayout.sse) != 0) }
        for (i, c) in layout.components where rfbm & (1 << UInt64(i)) != 0 {
            load(c.offset..<(c.offset + c.size), fromGuest: xstateBV & (1 << UInt64(i)) != 0)
        }
        Self.store64(Self.load64(state, at: XSaveLayout.headerStart) | rfbm, into: &state, at: XSaveLayout.headerStart)
        do { try vcpu.setXSAVEArea(state) } catch {
            // KVM validates the buffer as the CPU validates the area; what it refuses, the CPU would too.
            return (Self.gp, 0, nil)
        }
        return nil
    }

    // MARK: - Little-endian helpers (offsets checked by the callers against the area's size)

    static func load16(_ b: [UInt8], at o: Int) -> UInt16 { UInt16(b[o]) | UInt16(b[o + 1]) << 8 }
    static func load32(_ b: [UInt8], at o: Int) -> UInt32 { (0..<4).reduce(UInt32(0)) { $0 | UInt32(b[o + $1]) << UInt32(8 * $1) } }
    static func load64(_ b: [UInt8], at o: Int) -> UInt64 { (0..<8).reduce(UInt64(0)) { $0 | UInt64(b[o + $1]) << UInt64(8 * $1) } }
    static func store16(_ v: UInt16, into b: inout [UInt8], at o: Int) { for k in 0..<2 { b[o + k] = UInt8(truncatingIfNeeded: v >> UInt16(8 * k)) } }
    static func store32(_ v: UInt32, into b: inout [UInt8], at o: Int) { for k in 0..<4 { b[o + k] = UInt8(truncatingIfNeeded: v >> UInt32(8 * k)) } }
    static func store64(_ v: UInt64, into b: inout [UInt8], at o: Int) { for k in 0..<8 { b[o + k] = UInt8(truncatingIfNeeded: v >> UInt64(8 * k)) } }

    private func kvm<T>(_ body: () throws(KVMError) -> T) throws(ExtendedStateError) -> T {
        do { return try body() } catch { throw .kvm(error) }
    }
}

/// Why an extended-state instruction could not be completed (the VM then stops with the
/// instruction's bytes, as for any emulation failure).
public enum ExtendedStateError: Error, CustomStringConvertible, Sendable {
    case kvm(KVMError)
    case unsupported(String)
    public var description: String {
        switch self {
        case let .kvm(e): return "\(e)"
        case let .unsupported(m): return m
        }
    }
}
