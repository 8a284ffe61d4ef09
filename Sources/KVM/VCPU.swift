import AirlockOS
import CAirlockShim
#if canImport(Glibc)
import Glibc
#endif

/// A vCPU file descriptor and its mmapped kvm_run page.
///
/// The run page is shared with the kernel: KVM writes the exit description into
/// it during KVM_RUN and reads the VMM's answers (I/O data) when KVM_RUN is next
/// called. Only the vCPU's own thread runs it and reads exits; other threads may
/// only call `requestImmediateExit()` (a one-byte store the kernel reads on
/// entry), which is why the type is `@unchecked Sendable`.
public final class VCPU: @unchecked Sendable {
    public let id: UInt32
    let fd: OwnedFileDescriptor
    /// Owner of the kvm_run mapping; `run` points into it and lives as long as self.
    private let runPage: MemoryMapping
    private let runStruct: UnsafeMutablePointer<kvm_run>

    /// Bytes of the extended-state buffer (KVM_GET_XSAVE2's size, at least struct kvm_xsave's 4 KiB).
    public let xsaveSize: Int
    /// Whether KVM_GET_XSAVE2 exists; without it KVM_GET_XSAVE gives the first 4 KiB.
    private let hasXSAVE2: Bool

    init(id: UInt32, fd: OwnedFileDescriptor, runPage: MemoryMapping, xsaveSize: Int = 0) {
        precondition(runPage.length >= MemoryLayout<kvm_run>.size, "kvm_run mapping smaller than struct kvm_run")
        self.id = id
        self.hasXSAVE2 = xsaveSize > 0
        self.xsaveSize = max(xsaveSize, MemoryLayout<kvm_xsave>.size)
        self.fd = fd
        self.runPage = runPage
        // Sound: the mapping is at least sizeof(kvm_run) bytes (checked above), page-aligned, and owned by self.
        self.runStruct = runPage.base.bindMemory(to: kvm_run.self, capacity: 1)
    }

    // MARK: Running

    /// Enters the guest until the next exit and decodes it.
    @inline(__always)
    public func run() throws(KVMError) -> VCPUExit {
        switch interruptibleSyscall("KVM_RUN", { airlockIoctlVal(fd.rawValue, AIRLOCK_KVM_RUN, 0) }) {
        case .success: break
        case let .failure(error):
            if error.errno == EINTR || error.errno == EAGAIN {
                runStruct.pointee.immediate_exit = 0
                return .interrupted
            }
            throw .ioctl(error)
        }
        return decodeExit()
    }

    @inline(__always)
    private func decodeExit() -> VCPUExit {
        let r = runStruct.pointee
        switch r.exit_reason {
        case AIRLOCK_KVM_EXIT_IO:
            let io = r.io
            return .io(port: io.port, size: Int(io.size), count: Int(io.count),
                       direction: UInt32(io.direction) == AIRLOCK_KVM_EXIT_IO_OUT ? .write : .read)
        case AIRLOCK_KVM_EXIT_MMIO:
            let m = r.mmio
            return .mmio(address: m.phys_addr, length: Int(m.len), direction: m.is_write != 0 ? .write : .read)
        case AIRLOCK_KVM_EXIT_HLT: return .hlt
        case AIRLOCK_KVM_EXIT_SHUTDOWN: return .shutdown
        case AIRLOCK_KVM_EXIT_INTR: return .interrupted
        case AIRLOCK_KVM_EXIT_SYSTEM_EVENT:
            let e = r.system_event
            let n = min(Int(e.ndata), 16)
            var data: [UInt64] = []
            withUnsafeBytes(of: e.data) { p in data = Array(p.bindMemory(to: UInt64.self).prefix(n)) }
            if data.isEmpty { data = [e.flags] }
            return .systemEvent(type: e.type, data: data)
        case AIRLOCK_KVM_EXIT_INTERNAL_ERROR:
            let e = r.internal
            let n = min(Int(e.ndata), 16)
            var data: [UInt64] = []
            withUnsafeBytes(of: e.data) { p in data = Array(p.bindMemory(to: UInt64.self).prefix(n)) }
            return .internalError(suberror: e.suberror, data: data)
        case AIRLOCK_KVM_EXIT_FAIL_ENTRY:
            return .failEntry(hardwareReason: r.fail_entry.hardware_entry_failure_reason, cpu: r.fail_entry.cpu)
        default:
            return .unhandled(reason: r.exit_reason)
        }
    }

    /// Lends the data area of the current I/O or MMIO exit: the bytes an OUT or
    /// MMIO write carried, or the place to put what an IN or MMIO read returns.
    /// Empty for other exits. The buffer is valid only inside `body`.
    @inline(__always)
    public func withExitData<R>(_ body: (UnsafeMutableRawBufferPointer) throws -> R) rethrows -> R {
        let r = runStruct.pointee
        switch r.exit_reason {
        case AIRLOCK_KVM_EXIT_IO:
            let io = r.io
            let length = Int(io.size) * Int(io.count)
            let offset = Int(io.data_offset)
            // The kernel sets data_offset inside the mapping; check anyway rather than trust it.
            guard offset >= 0, length >= 0, offset <= runPage.length, length <= runPage.length - offset else {
                return try body(UnsafeMutableRawBufferPointer(start: nil, count: 0))
            }
            // Sound: [offset, offset+length) lies inside the run page (checked above).
            return try body(UnsafeMutableRawBufferPointer(start: runPage.base + offset, count: length))
        case AIRLOCK_KVM_EXIT_MMIO:
            let length = min(Int(r.mmio.len), 8)
            // Sound: mmio.data is an 8-byte array inside kvm_run, which lies inside the mapping.
            let dataOffset = Int(airlock_kvm_run_mmio_data_offset())
            return try body(UnsafeMutableRawBufferPointer(start: UnsafeMutableRawPointer(runStruct) + dataOffset, count: length))
        default:
            return try body(UnsafeMutableRawBufferPointer(start: nil, count: 0))
        }
    }

    /// Makes the next (or current) KVM_RUN return at once. Safe from any thread;
    /// pair it with a signal to the vCPU thread to interrupt a running guest.
    public func requestImmediateExit() {
        // A plain byte store; KVM reads it on each entry. Races are benign: at worst
        // the guest runs until its next exit, and the signal that follows interrupts it.
        UnsafeMutableRawPointer(runStruct).storeBytes(of: 1, toByteOffset: Int(airlock_kvm_run_immediate_exit_offset()), as: UInt8.self)
    }

    /// Clears immediate_exit again (after `completePendingExit`).
    func clearImmediateExit() {
        UnsafeMutableRawPointer(runStruct).storeBytes(of: 0, toByteOffset: Int(airlock_kvm_run_immediate_exit_offset()), as: UInt8.self)
    }

    // MARK: State

    public func registers() throws(KVMError) -> Registers {
        var r = kvm_regs()
        _ = try kvmIoctl(fd.rawValue, AIRLOCK_KVM_GET_REGS, "KVM_GET_REGS", &r)
        return Registers(r)
    }

    public func setRegisters(_ regs: Registers) throws(KVMError) {
        var r = regs.raw
        _ = try kvmIoctl(fd.rawValue, AIRLOCK_KVM_SET_REGS, "KVM_SET_REGS", &r)
    }

    public func specialRegisters() throws(KVMError) -> SpecialRegisters {
        var s = kvm_sregs()
        _ = try kvmIoctl(fd.rawValue, AIRLOCK_KVM_GET_SREGS, "KVM_GET_SREGS", &s)
        return SpecialRegisters(s)
    }

    public func setSpecialRegisters(_ sregs: SpecialRegisters) throws(KVMError) {
        var s = kvm_sregs()
        _ = try kvmIoctl(fd.rawValue, AIRLOCK_KVM_GET_SREGS, "KVM_GET_SREGS", &s)
        sregs.apply(to: &s)
        _ = try kvmIoctl(fd.rawValue, AIRLOCK_KVM_SET_SREGS, "KVM_SET_SREGS", &s)
    }

    public func setCPUID(_ table: CPUIDTable) throws(KVMError) {
        var raw = table.raw
        _ = try withUnsafeMutableBytes(of: &raw) { (p) throws(KVMError) -> Int32 in
            try kvmIoctl(fd.rawValue, AIRLOCK_KVM_SET_CPUID2, "KVM_SET_CPUID2", p.baseAddress)
        }
    }

    /// KVM_SET_MSRS; returns how many were set (KVM stops at the first it rejects).
    @discardableResult
    public func setMSRs(_ msrs: [(index: UInt32, value: UInt64)]) throws(KVMError) -> Int {
        var raw = airlock_msrs()
        let count = min(msrs.count, Int(AIRLOCK_MAX_MSR_ENTRIES))
        raw.nmsrs = UInt32(count)
        withUnsafeMutableBytes(of: &raw.entries) { p in
            let e = p.bindMemory(to: kvm_msr_entry.self)
            for i in 0..<count { e[i] = kvm_msr_entry(index: msrs[i].index, reserved: 0, data: msrs[i].value) }
        }
        return Int(try withUnsafeMutableBytes(of: &raw) { (p) throws(KVMError) -> Int32 in
            try kvmIoctl(fd.rawValue, AIRLOCK_KVM_SET_MSRS, "KVM_SET_MSRS", p.baseAddress)
        })
    }

    /// KVM_GET_MSRS: the values of those of `indices` KVM could read, in order
    /// (KVM stops at the first it cannot read).
    public func msrs(_ indices: [UInt32]) throws(KVMError) -> [(index: UInt32, value: UInt64)] {
        var raw = airlock_msrs()
        let count = min(indices.count, Int(AIRLOCK_MAX_MSR_ENTRIES))
        raw.nmsrs = UInt32(count)
        withUnsafeMutableBytes(of: &raw.entries) { p in
            let e = p.bindMemory(to: kvm_msr_entry.self)
            for i in 0..<count { e[i] = kvm_msr_entry(index: indices[i], reserved: 0, data: 0) }
        }
        let read = Int(try withUnsafeMutableBytes(of: &raw) { (p) throws(KVMError) -> Int32 in
            try kvmIoctl(fd.rawValue, AIRLOCK_KVM_GET_MSRS, "KVM_GET_MSRS", p.baseAddress)
        })
        return withUnsafeBytes(of: &raw.entries) { p in
            let e = p.bindMemory(to: kvm_msr_entry.self)
            return (0..<min(read, count)).map { (e[$0].index, e[$0].data) }
        }
    }

    /// Sets the x87/SSE state's control words (FCW, MXCSR) to their reset values.
    public func resetFPU() throws(KVMError) {
        var fpu = kvm_fpu()
        fpu.fcw = 0x37f
        fpu.mxcsr = 0x1f80
        _ = try kvmIoctl(fd.rawValue, AIRLOCK_KVM_SET_FPU, "KVM_SET_FPU", &fpu)
    }

    /// Queues exception `vector` (without error code) for delivery on the next entry.
    public func injectException(vector: UInt8) throws(KVMError) {
        var events = kvm_vcpu_events()
        _ = try kvmIoctl(fd.rawValue, AIRLOCK_KVM_GET_VCPU_EVENTS, "KVM_GET_VCPU_EVENTS", &events)
        events.exception.injected = 1
        events.exception.nr = vector
        events.exception.has_error_code = 0
        events.exception.error_code = 0
        events.flags = 0
        _ = try kvmIoctl(fd.rawValue, AIRLOCK_KVM_SET_VCPU_EVENTS, "KVM_SET_VCPU_EVENTS", &events)
    }

    /// Queues exception `vector` with `errorCode` (#GP, #PF, ...) for delivery on the next entry.
    public func injectException(vector: UInt8, errorCode: UInt32) throws(KVMError) {
        var events = kvm_vcpu_events()
        _ = try kvmIoctl(fd.rawValue, AIRLOCK_KVM_GET_VCPU_EVENTS, "KVM_GET_VCPU_EVENTS", &events)
        events.exception.injected = 1
        events.exception.nr = vector
        events.exception.has_error_code = 1
        events.exception.error_code = errorCode
        events.flags = 0
        _ = try kvmIoctl(fd.rawValue, AIRLOCK_KVM_SET_VCPU_EVENTS, "KVM_SET_VCPU_EVENTS", &events)
    }

    /// Queues a page fault for `address` (its CR2) with `errorCode`. Needs the VM's
    /// exception payload (`VirtualMachine.enableExceptionPayload`): KVM sets CR2 itself as it
    /// delivers the fault, so the special registers are never rewritten mid-run.
    public func injectPageFault(address: UInt64, errorCode: UInt32) throws(KVMError) {
        var events = kvm_vcpu_events()
        _ = try kvmIoctl(fd.rawValue, AIRLOCK_KVM_GET_VCPU_EVENTS, "KVM_GET_VCPU_EVENTS", &events)
        events.exception.injected = 0
        events.exception.pending = 1
        events.exception.nr = 14
        events.exception.has_error_code = 1
        events.exception.error_code = errorCode
        events.exception_has_payload = 1
        events.exception_payload = address
        events.flags = AIRLOCK_KVM_VCPUEVENT_VALID_PAYLOAD
        _ = try kvmIoctl(fd.rawValue, AIRLOCK_KVM_SET_VCPU_EVENTS, "KVM_SET_VCPU_EVENTS", &events)
    }

    /// Whether an interrupt or exception is waiting to be delivered to the guest.
    public func hasPendingEvent() throws(KVMError) -> Bool {
        var events = kvm_vcpu_events()
        _ = try kvmIoctl(fd.rawValue, AIRLOCK_KVM_GET_VCPU_EVENTS, "KVM_GET_VCPU_EVENTS", &events)
        return events.exception.injected != 0 || events.exception.pending != 0
            || events.interrupt.injected != 0 || events.nmi.injected != 0 || events.nmi.pending != 0
    }
}

extension VCPU {
    /// The local APIC's 1 KiB register page (KVM_GET_LAPIC).
    public func lapicRegisters() throws(KVMError) -> [UInt8] {
        var state = kvm_lapic_state()
        _ = try kvmIoctl(fd.rawValue, AIRLOCK_KVM_GET_LAPIC, "KVM_GET_LAPIC", &state)
        return withUnsafeBytes(of: &state.regs) { Array($0) }
    }

    /// Replaces the local APIC's register page (KVM_SET_LAPIC); `regs` must be 1 KiB.
    public func setLAPICRegisters(_ regs: [UInt8]) throws(KVMError) {
        var state = kvm_lapic_state()
        withUnsafeMutableBytes(of: &state.regs) { dst in
            dst.copyBytes(from: regs.prefix(dst.count))
        }
        _ = try kvmIoctl(fd.rawValue, AIRLOCK_KVM_SET_LAPIC, "KVM_SET_LAPIC", &state)
    }
}

extension VCPU {
    /// The vCPU's extended state (x87, SSE, AVX, AVX-512, PKRU, ...) in the standard,
    /// non-compacted XSAVE layout, `xsaveSize` bytes (KVM_GET_XSAVE2 or KVM_GET_XSAVE).
    public func xsaveArea() throws(KVMError) -> [UInt8] {
        var area = [UInt8](repeating: 0, count: xsaveSize)
        let request = hasXSAVE2 ? AIRLOCK_KVM_GET_XSAVE2 : AIRLOCK_KVM_GET_XSAVE
        // Sound: the buffer is xsaveSize bytes, at least what the request writes
        // (KVM_GET_XSAVE2 writes KVM_CAP_XSAVE2's size, KVM_GET_XSAVE sizeof(struct kvm_xsave)).
        let name = hasXSAVE2 ? "KVM_GET_XSAVE2" : "KVM_GET_XSAVE"
        let done: Result<Int32, KVMError> = area.withUnsafeMutableBytes { p in
            Result { () throws(KVMError) in try kvmIoctl(fd.rawValue, request, name, p.baseAddress) }
        }
        _ = try done.get()
        return area
    }

    /// Replaces the vCPU's extended state (KVM_SET_XSAVE); `area` is `xsaveSize` bytes as
    /// `xsaveArea()` returned them. KVM refuses features the vCPU's CPUID does not offer.
    public func setXSAVEArea(_ area: [UInt8]) throws(KVMError) {
        var copy = area
        if copy.count < xsaveSize { copy += [UInt8](repeating: 0, count: xsaveSize - copy.count) }
        // Sound: KVM reads sizeof(struct kvm_xsave) plus, with XSAVE2, up to xsaveSize bytes.
        let done: Result<Int32, KVMError> = copy.withUnsafeMutableBytes { p in
            Result { () throws(KVMError) in try kvmIoctl(fd.rawValue, AIRLOCK_KVM_SET_XSAVE, "KVM_SET_XSAVE", p.baseAddress) }
        }
        _ = try done.get()
    }

    /// XCR0, the extended features the guest kernel enabled with XSETBV (KVM_GET_XCRS).
    public func xcr0() throws(KVMError) -> UInt64 {
        var xcrs = kvm_xcrs()
        _ = try kvmIoctl(fd.rawValue, AIRLOCK_KVM_GET_XCRS, "KVM_GET_XCRS", &xcrs)
        let count = min(Int(xcrs.nr_xcrs), Int(KVM_MAX_XCRS))
        return withUnsafeBytes(of: &xcrs.xcrs) { raw in
            let entries = raw.bindMemory(to: kvm_xcr.self)
            return entries.prefix(count).first(where: { $0.xcr == 0 })?.value ?? 1
        }
    }
}
