import AirlockOS
import CAirlockShim
#if canImport(Glibc)
import Glibc
#endif

/// One model-specific register as KVM_GET_MSRS and KVM_SET_MSRS move it.
public struct MSREntry: Equatable, Sendable {
    public var index: UInt32
    public var value: UInt64
    public init(index: UInt32, value: UInt64) { self.index = index; self.value = value }
}

/// Everything KVM keeps for one vCPU that a restored VM must get back, as KVM's
/// own structures (`struct kvm_regs`, `kvm_sregs`, ...) byte for byte. They go
/// back to KVM unchanged, which checks them as it checks any VMM's input; this
/// type checks their sizes (`validate`), and decodes the few fields Airlock
/// reads itself (`registers`).
///
/// The structures are x86-64 Linux's, fixed by the kernel's user-space ABI, so
/// a state taken on one Linux host means the same on another; whether that
/// host's CPU and KVM can run it is the snapshot manifest's business.
public struct VCPUState: Equatable, Sendable {
    /// The CPUID table the vCPU was given (KVM_SET_CPUID2), set first on
    /// restore: it decides which MSRs and XSAVE components exist.
    public var cpuid: CPUIDTable
    /// struct kvm_regs: general registers, RIP, RFLAGS.
    public var regs: [UInt8]
    /// struct kvm_sregs: segments, control registers, EFER, APIC base, pending-interrupt bitmap.
    public var sregs: [UInt8]
    /// struct kvm_xsave: x87, SSE, AVX and every other XSAVE component (KVM_GET_XSAVE2's size where offered).
    public var xsave: [UInt8]
    /// struct kvm_xcrs: XCR0.
    public var xcrs: [UInt8]
    /// struct kvm_lapic_state: the local APIC's 1 KiB register page.
    public var lapic: [UInt8]
    /// struct kvm_vcpu_events: pending exceptions, interrupts, NMIs, the interrupt shadow.
    public var events: [UInt8]
    /// KVM_MP_STATE_*: runnable, halted, ...
    public var mpState: UInt32
    /// struct kvm_debugregs: DR0-3, DR6, DR7.
    public var debugRegisters: [UInt8]
    /// Every MSR KVM lists (KVM_GET_MSR_INDEX_LIST) that it would read, plus any the caller asked for.
    public var msrs: [MSREntry]
    /// The vCPU's TSC frequency (KVM_GET_TSC_KHZ); 0 where KVM cannot say.
    public var tscKHz: UInt32

    public init(cpuid: CPUIDTable, regs: [UInt8], sregs: [UInt8], xsave: [UInt8], xcrs: [UInt8], lapic: [UInt8],
                events: [UInt8], mpState: UInt32, debugRegisters: [UInt8], msrs: [MSREntry], tscKHz: UInt32) {
        self.cpuid = cpuid; self.regs = regs; self.sregs = sregs; self.xsave = xsave; self.xcrs = xcrs
        self.lapic = lapic; self.events = events; self.mpState = mpState; self.debugRegisters = debugRegisters
        self.msrs = msrs; self.tscKHz = tscKHz
    }

    public static let regsSize = MemoryLayout<kvm_regs>.size
    public static let sregsSize = MemoryLayout<kvm_sregs>.size
    /// The legacy KVM_GET_XSAVE size; KVM_CAP_XSAVE2 may ask for more.
    public static let legacyXSAVESize = MemoryLayout<kvm_xsave>.size
    public static let xcrsSize = MemoryLayout<kvm_xcrs>.size
    public static let lapicSize = MemoryLayout<kvm_lapic_state>.size
    public static let eventsSize = MemoryLayout<kvm_vcpu_events>.size
    public static let debugRegistersSize = MemoryLayout<kvm_debugregs>.size
    /// More MSRs than any KVM lists (43 on the development host, about 60 on a recent Intel one).
    public static let maxMSRs = 1024
    /// The largest XSAVE area a restore accepts: every component Intel defines fits in 12 KiB today.
    public static let maxXSAVESize = 64 << 10

    /// Checks every structure's size (a state read from a file is untrusted): each
    /// must be exactly what this host's KVM moves, the XSAVE area what `xsaveSize` says.
    public func validate(xsaveSize: Int) throws(KVMError) {
        func need(_ bytes: [UInt8], _ size: Int, _ what: String) throws(KVMError) {
            guard bytes.count == size else {
                throw .invalidState("the saved \(what) is \(bytes.count) bytes where KVM's structure is \(size)")
            }
        }
        try need(regs, Self.regsSize, "general registers (kvm_regs)")
        try need(sregs, Self.sregsSize, "special registers (kvm_sregs)")
        try need(xsave, xsaveSize, "XSAVE area (kvm_xsave)")
        try need(xcrs, Self.xcrsSize, "XCRs (kvm_xcrs)")
        try need(lapic, Self.lapicSize, "local APIC (kvm_lapic_state)")
        try need(events, Self.eventsSize, "vCPU events (kvm_vcpu_events)")
        try need(debugRegisters, Self.debugRegistersSize, "debug registers (kvm_debugregs)")
        guard msrs.count <= Self.maxMSRs else {
            throw .invalidState("the saved state has \(msrs.count) MSRs, more than the \(Self.maxMSRs) any KVM lists")
        }
        guard cpuid.entries.count <= Int(AIRLOCK_MAX_CPUID_ENTRIES) else {
            throw .invalidState("the saved CPUID table has \(cpuid.entries.count) entries, more than \(AIRLOCK_MAX_CPUID_ENTRIES)")
        }
    }

    /// The general registers, decoded.
    public var registers: Registers? {
        guard regs.count == Self.regsSize else { return nil }
        var r = kvm_regs()
        withUnsafeMutableBytes(of: &r) { $0.copyBytes(from: regs) }
        return Registers(r)
    }

    /// The value of MSR `index`, if it was saved.
    public func msr(_ index: UInt32) -> UInt64? { msrs.first { $0.index == index }?.value }
}

/// The in-kernel devices of a VM (KVM_CREATE_IRQCHIP, KVM_CREATE_PIT2) and
/// its clock, as KVM's own structures.
public struct VMState: Equatable, Sendable {
    /// struct kvm_irqchip for chip 0 (PIC master), 1 (PIC slave), 2 (IOAPIC).
    public var irqChips: [[UInt8]]
    /// struct kvm_pit_state2: the three PIT channels.
    public var pit: [UInt8]
    /// kvmclock's value (KVM_GET_CLOCK), ns since the VM's clock started.
    public var clock: UInt64

    public init(irqChips: [[UInt8]], pit: [UInt8], clock: UInt64) {
        self.irqChips = irqChips; self.pit = pit; self.clock = clock
    }

    public static let irqChipSize = MemoryLayout<kvm_irqchip>.size
    public static let pitSize = MemoryLayout<kvm_pit_state2>.size
    /// PIC master, PIC slave, IOAPIC.
    public static let irqChipCount = 3

    public func validate() throws(KVMError) {
        guard irqChips.count == Self.irqChipCount else {
            throw .invalidState("the saved interrupt controllers are \(irqChips.count), not the \(Self.irqChipCount) of KVM's irqchip (two PICs and an IOAPIC)")
        }
        for (i, chip) in irqChips.enumerated() where chip.count != Self.irqChipSize {
            throw .invalidState("saved interrupt controller \(i) is \(chip.count) bytes where kvm_irqchip is \(Self.irqChipSize)")
        }
        // The chip id inside each record must be its position: KVM_SET_IRQCHIP picks the chip by it.
        for (i, chip) in irqChips.enumerated() {
            let id = UInt32(chip[0]) | UInt32(chip[1]) << 8 | UInt32(chip[2]) << 16 | UInt32(chip[3]) << 24
            guard id == UInt32(i) else { throw .invalidState("saved interrupt controller \(i) names chip \(id)") }
        }
        guard pit.count == Self.pitSize else {
            throw .invalidState("the saved PIT is \(pit.count) bytes where kvm_pit_state2 is \(Self.pitSize)")
        }
    }
}

extension KVMSystem {
    /// Every MSR this KVM saves and restores for a vCPU (KVM_GET_MSR_INDEX_LIST).
    public func msrIndexList() throws(KVMError) -> [UInt32] {
        // struct kvm_msr_list: nmsrs, then that many indices. KVM fails with
        // E2BIG (and says how many) when the buffer is short: grow once.
        var capacity = 256
        for _ in 0..<2 {
            var buffer = [UInt32](repeating: 0, count: capacity + 1)
            buffer[0] = UInt32(capacity)
            let result = buffer.withUnsafeMutableBytes { p in
                interruptibleSyscall("KVM_GET_MSR_INDEX_LIST") { airlockIoctlPtr(fd.rawValue, AIRLOCK_KVM_GET_MSR_INDEX_LIST, p.baseAddress) }
            }
            switch result {
            case .success: return Array(buffer[1...].prefix(Int(min(buffer[0], UInt32(capacity)))))
            case let .failure(e) where e.errno == E2BIG && Int(buffer[0]) > capacity: capacity = Int(buffer[0])
            case let .failure(e) where e.errno == EINTR: continue
            case let .failure(e): throw .ioctl(e)
            }
        }
        throw .invalidState("KVM_GET_MSR_INDEX_LIST kept growing")
    }

    /// The size of a vCPU's XSAVE state: KVM_CAP_XSAVE2's answer (which counts
    /// every component the guest may use), or the legacy 4 KiB.
    public var xsaveSize: Int {
        let size = Int(checkExtension(AIRLOCK_KVM_CAP_XSAVE2))
        return size > VCPUState.legacyXSAVESize ? size : VCPUState.legacyXSAVESize
    }

    /// The capabilities saving and restoring a VM needs, beyond those every boot needs.
    static let snapshotRequired: [(name: String, cap: Int32)] = [
        ("KVM_CAP_XSAVE", AIRLOCK_KVM_CAP_XSAVE),
        ("KVM_CAP_XCRS", AIRLOCK_KVM_CAP_XCRS),
        ("KVM_CAP_DEBUGREGS", AIRLOCK_KVM_CAP_DEBUGREGS),
        ("KVM_CAP_MP_STATE", AIRLOCK_KVM_CAP_MP_STATE),
        ("KVM_CAP_PIT_STATE2", AIRLOCK_KVM_CAP_PIT_STATE2),
        ("KVM_CAP_ADJUST_CLOCK", AIRLOCK_KVM_CAP_ADJUST_CLOCK),
        ("KVM_CAP_VCPU_EVENTS", AIRLOCK_KVM_CAP_VCPU_EVENTS),
    ]

    /// Throws naming the first capability a snapshot needs that this host lacks.
    public func checkSnapshotCapabilities() throws(KVMError) {
        for (name, cap) in Self.snapshotRequired where checkExtension(cap) <= 0 {
            throw .missingCapability(name + " (for snapshots)")
        }
    }
}

extension VCPU {
    /// KVM_GET_TSC_KHZ: the vCPU's TSC frequency, 0 where KVM cannot say.
    public func tscKHz() -> UInt32 {
        UInt32(max(0, (try? kvmIoctl(fd.rawValue, AIRLOCK_KVM_GET_TSC_KHZ, "KVM_GET_TSC_KHZ", value: 0)) ?? 0))
    }

    /// KVM_GET_MSRS for `indices`. KVM stops at the first MSR it cannot read
    /// and returns how many it read before it, so the read goes on after each
    /// refused one; the result holds only the MSRs that could be read.
    public func readMSRs(_ indices: [UInt32]) throws(KVMError) -> [MSREntry] {
        var out: [MSREntry] = []
        var start = 0
        while start < indices.count {
            let chunk = Array(indices[start...])
            let (read, entries) = try msrTransfer(request: AIRLOCK_KVM_GET_MSRS, name: "KVM_GET_MSRS",
                                                  chunk.map { MSREntry(index: $0, value: 0) })
            out += entries.prefix(read)
            start += read + 1  // past the one KVM refused
        }
        return out
    }

    /// KVM_SET_MSRS for every entry; throws naming the first one KVM refuses.
    public func writeMSRs(_ msrs: [MSREntry]) throws(KVMError) {
        guard !msrs.isEmpty else { return }
        let (written, _) = try msrTransfer(request: AIRLOCK_KVM_SET_MSRS, name: "KVM_SET_MSRS", msrs)
        guard written == msrs.count else {
            let refused = msrs[written]
            throw .invalidState("KVM refused MSR 0x\(String(refused.index, radix: 16)) = 0x\(String(refused.value, radix: 16)) (\(written) of \(msrs.count) set)")
        }
    }

    /// One KVM_GET_MSRS or KVM_SET_MSRS over a struct kvm_msrs built in a byte
    /// buffer (a header of 8 bytes, then 16 bytes per entry): returns KVM's count and the entries.
    private func msrTransfer(request: UInt, name: String, _ entries: [MSREntry]) throws(KVMError) -> (Int, [MSREntry]) {
        let header = MemoryLayout<kvm_msrs>.size, entrySize = MemoryLayout<kvm_msr_entry>.size
        var buffer = [UInt8](repeating: 0, count: header + entrySize * entries.count)
        buffer.withUnsafeMutableBytes { p in
            p.storeBytes(of: UInt32(entries.count), toByteOffset: 0, as: UInt32.self)
            for (i, e) in entries.enumerated() {
                p.storeBytes(of: kvm_msr_entry(index: e.index, reserved: 0, data: e.value), toByteOffset: header + i * entrySize, as: kvm_msr_entry.self)
            }
        }
        let count = try kvmIoctl(fd.rawValue, request, name, bytes: &buffer)
        let n = max(0, min(Int(count), entries.count))
        let back: [MSREntry] = buffer.withUnsafeBytes { p in
            (0..<entries.count).map { i in
                let e = p.loadUnaligned(fromByteOffset: header + i * entrySize, as: kvm_msr_entry.self)
                return MSREntry(index: e.index, value: e.data)
            }
        }
        return (n, back)
    }

    /// Completes the last exit's emulation without entering the guest: KVM
    /// finishes a pending port or MMIO read (it stores the data the VMM put in
    /// kvm_run into the guest's registers) on the next KVM_RUN, and with
    /// immediate_exit set that KVM_RUN returns EINTR right after. Without it a
    /// state saved after an IN exit would lose the value read. Call on the
    /// vCPU's own thread, after it has stopped running.
    public func completePendingExit() throws(KVMError) {
        requestImmediateExit()
        switch interruptibleSyscall("KVM_RUN", { airlockIoctlVal(fd.rawValue, AIRLOCK_KVM_RUN, 0) }) {
        case .success:
            break  // returned without EINTR: an exit was already due
        case let .failure(e) where e.errno == EINTR || e.errno == EAGAIN:
            break
        case let .failure(e):
            clearImmediateExit()
            throw .ioctl(e)
        }
        clearImmediateExit()
    }

    /// Saves this vCPU's whole state. The vCPU must not be running (its thread
    /// stopped, and `completePendingExit` called after its last exit).
    /// `cpuid` is the table it was given: KVM_GET_CPUID2 would return it with
    /// bits KVM keeps in step with the guest's own settings (OSXSAVE follows
    /// CR4), which a restore recomputes from the saved registers anyway.
    public func captureState(cpuid: CPUIDTable, msrIndices: [UInt32], xsaveSize: Int) throws(KVMError) -> VCPUState {
        func get(_ request: UInt, _ name: String, size: Int) throws(KVMError) -> [UInt8] {
            var bytes = [UInt8](repeating: 0, count: size)
            _ = try kvmIoctl(fd.rawValue, request, name, bytes: &bytes)
            return bytes
        }
        let regs = try get(AIRLOCK_KVM_GET_REGS, "KVM_GET_REGS", size: VCPUState.regsSize)
        let sregs = try get(AIRLOCK_KVM_GET_SREGS, "KVM_GET_SREGS", size: VCPUState.sregsSize)
        // KVM_GET_XSAVE2 fills as many bytes as KVM_CAP_XSAVE2 said; without the capability, KVM_GET_XSAVE's 4 KiB.
        let xsave = xsaveSize > VCPUState.legacyXSAVESize
            ? try get(AIRLOCK_KVM_GET_XSAVE2, "KVM_GET_XSAVE2", size: xsaveSize)
            : try get(AIRLOCK_KVM_GET_XSAVE, "KVM_GET_XSAVE", size: VCPUState.legacyXSAVESize)
        let xcrs = try get(AIRLOCK_KVM_GET_XCRS, "KVM_GET_XCRS", size: VCPUState.xcrsSize)
        let lapic = try get(AIRLOCK_KVM_GET_LAPIC, "KVM_GET_LAPIC", size: VCPUState.lapicSize)
        let events = try get(AIRLOCK_KVM_GET_VCPU_EVENTS, "KVM_GET_VCPU_EVENTS", size: VCPUState.eventsSize)
        var mp = kvm_mp_state()
        _ = try kvmIoctl(fd.rawValue, AIRLOCK_KVM_GET_MP_STATE, "KVM_GET_MP_STATE", &mp)
        let debug = try get(AIRLOCK_KVM_GET_DEBUGREGS, "KVM_GET_DEBUGREGS", size: VCPUState.debugRegistersSize)
        let msrs = try readMSRs(msrIndices)
        return VCPUState(cpuid: cpuid, regs: regs, sregs: sregs, xsave: xsave, xcrs: xcrs, lapic: lapic, events: events,
                         mpState: mp.mp_state, debugRegisters: debug, msrs: msrs, tscKHz: tscKHz())
    }

    /// Gives a freshly created vCPU a saved state. The order matters:
    /// CPUID first (it decides which MSRs and XSAVE components exist); the
    /// special registers before the LAPIC (they carry the APIC base) and the
    /// XSAVE area (CR4.OSXSAVE); MSRs after the LAPIC (the TSC deadline is
    /// kept in its timer), with the TSC first and the deadline last; the
    /// MP state and then the pending events last, so nothing set later
    /// overwrites a pending exception or interrupt.
    public func restoreState(_ s: VCPUState, xsaveSize: Int) throws(KVMError) {
        try s.validate(xsaveSize: xsaveSize)
        func set(_ bytes: [UInt8], _ request: UInt, _ name: String) throws(KVMError) {
            var copy = bytes
            _ = try kvmIoctl(fd.rawValue, request, name, bytes: &copy)
        }
        try setCPUID(s.cpuid)
        try set(s.sregs, AIRLOCK_KVM_SET_SREGS, "KVM_SET_SREGS")
        try set(s.xsave, AIRLOCK_KVM_SET_XSAVE, "KVM_SET_XSAVE")
        try set(s.xcrs, AIRLOCK_KVM_SET_XCRS, "KVM_SET_XCRS")
        try set(s.regs, AIRLOCK_KVM_SET_REGS, "KVM_SET_REGS")
        try set(s.lapic, AIRLOCK_KVM_SET_LAPIC, "KVM_SET_LAPIC")
        try writeMSRs(Self.restoreOrder(s.msrs))
        try set(s.debugRegisters, AIRLOCK_KVM_SET_DEBUGREGS, "KVM_SET_DEBUGREGS")
        var mp = kvm_mp_state(mp_state: s.mpState)
        _ = try kvmIoctl(fd.rawValue, AIRLOCK_KVM_SET_MP_STATE, "KVM_SET_MP_STATE", &mp)
        try set(s.events, AIRLOCK_KVM_SET_VCPU_EVENTS, "KVM_SET_VCPU_EVENTS")
    }

    static let tscMSR: UInt32 = 0x10
    static let tscDeadlineMSR: UInt32 = 0x6E0

    /// The TSC first (writing it moves KVM's TSC offset, which the deadline is
    /// measured against), the TSC deadline last; the rest as saved.
    public static func restoreOrder(_ msrs: [MSREntry]) -> [MSREntry] {
        msrs.filter { $0.index == tscMSR } + msrs.filter { $0.index != tscMSR && $0.index != tscDeadlineMSR }
            + msrs.filter { $0.index == tscDeadlineMSR }
    }
}

extension VirtualMachine {
    /// Saves the in-kernel PICs, IOAPIC, PIT and kvmclock. No vCPU may be running.
    public func captureState() throws(KVMError) -> VMState {
        var chips: [[UInt8]] = []
        for id in 0..<UInt32(VMState.irqChipCount) {
            var chip = kvm_irqchip()
            chip.chip_id = id
            _ = try kvmIoctl(fd.rawValue, AIRLOCK_KVM_GET_IRQCHIP, "KVM_GET_IRQCHIP", &chip)
            chips.append(withUnsafeBytes(of: &chip) { Array($0) })
        }
        var pit = kvm_pit_state2()
        _ = try kvmIoctl(fd.rawValue, AIRLOCK_KVM_GET_PIT2, "KVM_GET_PIT2", &pit)
        var clock = kvm_clock_data()
        _ = try kvmIoctl(fd.rawValue, AIRLOCK_KVM_GET_CLOCK, "KVM_GET_CLOCK", &clock)
        return VMState(irqChips: chips, pit: withUnsafeBytes(of: &pit) { Array($0) }, clock: clock.clock)
    }

    /// Gives a fresh VM (irqchip and PIT created) a saved state. The clock is
    /// set to the saved value alone, so the guest's monotonic time goes on from
    /// the moment it was saved, as after a pause; moving its wall clock to the
    /// host's is the guest agent's job.
    public func restoreState(_ s: VMState) throws(KVMError) {
        try s.validate()
        for bytes in s.irqChips {
            var chip = kvm_irqchip()
            withUnsafeMutableBytes(of: &chip) { $0.copyBytes(from: bytes) }
            _ = try kvmIoctl(fd.rawValue, AIRLOCK_KVM_SET_IRQCHIP, "KVM_SET_IRQCHIP", &chip)
        }
        var pit = kvm_pit_state2()
        withUnsafeMutableBytes(of: &pit) { $0.copyBytes(from: s.pit) }
        _ = try kvmIoctl(fd.rawValue, AIRLOCK_KVM_SET_PIT2, "KVM_SET_PIT2", &pit)
        // Flags 0: KVM_CLOCK_REALTIME or HOST_TSC would have KVM add the time that passed.
        var clock = kvm_clock_data()
        clock.clock = s.clock
        _ = try kvmIoctl(fd.rawValue, AIRLOCK_KVM_SET_CLOCK, "KVM_SET_CLOCK", &clock)
    }
}
