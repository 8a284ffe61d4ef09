import KVM

/// What the exit handler needs from a vCPU beyond the exit itself. `VCPU`
/// provides it through KVM; tests provide a fake, so every exit path can be
/// driven without /dev/kvm.
public protocol VCPUControl: ExtendedStateVCPU {
    var id: UInt32 { get }
    func hasPendingEvent() throws(KVMError) -> Bool
}

extension VCPU: VCPUControl {}

/// What the run loop does after an exit.
public enum ExitAction: Equatable, Sendable {
    case resume
    case stop(SystemEvent)
}

/// Turns one vCPU exit into bus accesses, assists, or the end of the run.
///
/// Runs on the vCPU thread for every exit, so the common cases (port and MMIO
/// accesses) do no allocation and no system call beyond the device's own.
public struct ExitHandler: Sendable {
    public let portBus: Bus
    public let mmioBus: Bus
    /// Complete int3/fwait emulation failures (PVM hosts only).
    public let emulationAssists: Bool
    /// Completes the extended-state instructions the emulator rejects (PVM hosts only; nil elsewhere).
    public let extendedState: ExtendedStateAssist?

    public init(portBus: Bus, mmioBus: Bus, emulationAssists: Bool, extendedState: ExtendedStateAssist? = nil) {
        self.portBus = portBus
        self.mmioBus = mmioBus
        self.emulationAssists = emulationAssists
        self.extendedState = extendedState
    }

    /// KVM_INTERNAL_ERROR_EMULATION
    static let emulationSuberror: UInt32 = 1

    /// Handles `exit`. `data` is the exit's data area (`VCPU.withExitData`).
    public func handle(_ exit: VCPUExit, data: UnsafeMutableRawBufferPointer, vcpu: some VCPUControl) throws(VMMError) -> ExitAction {
        switch exit {
        case let .io(port, size, count, direction):
            handlePortIO(port: UInt64(port), size: size, count: count, direction: direction, data: data)
            return .resume
        case let .mmio(address, length, direction):
            handleMMIO(address: address, length: length, direction: direction, data: data)
            return .resume
        case .interrupted:
            return .resume
        case .hlt:
            // Only seen without an in-kernel irqchip. With interrupts off and nothing
            // pending no event can ever wake the vCPU: the guest has stopped for good.
            let regs = try kvm { () throws(KVMError) in try vcpu.registers() }
            let interruptsEnabled = regs.rflags & (1 << 9) != 0
            if !interruptsEnabled, try !kvm({ () throws(KVMError) in try vcpu.hasPendingEvent() }) {
                return .stop(SystemEvent(kind: .crash, cause: .haltedForever(rip: regs.rip), vcpu: vcpu.id))
            }
            return .resume
        case .shutdown:
            let rip = try? vcpu.registers().rip
            return .stop(SystemEvent(kind: .reset, cause: .tripleFault(rip: rip), vcpu: vcpu.id))
        case let .systemEvent(type, eventData):
            return .stop(SystemEvent.fromKVM(type: type, data: eventData, vcpu: vcpu.id))
        case let .internalError(suberror, words):
            if suberror == Self.emulationSuberror {
                return try handleEmulationFailure(words, vcpu: vcpu)
            }
            throw .internalError(vcpu: vcpu.id, suberror: suberror, data: words, rip: try? vcpu.registers().rip)
        case let .failEntry(reason, _):
            throw .entryFailed(vcpu: vcpu.id, hardwareReason: reason, rip: try? vcpu.registers().rip)
        case .unhandled:
            throw .unhandledExit(name: exit.name, vcpu: vcpu.id, rip: try? vcpu.registers().rip)
        }
    }

    @inline(__always)
    func handlePortIO(port: UInt64, size: Int, count: Int, direction: VCPUExit.Direction, data: UnsafeMutableRawBufferPointer) {
        // KVM only produces sizes 1, 2 and 4 and fits count*size in the data area;
        // check rather than trust, and drop anything that does not fit.
        guard size == 1 || size == 2 || size == 4, count >= 1, count <= data.count / size else { return }
        for i in 0..<count {
            let at = i * size
            switch direction {
            case .write:
                portBus.write(port, size: size, value: Self.load(data, at: at, size: size))
            case .read:
                Self.store(portBus.read(port, size: size), into: data, at: at, size: size)
            }
        }
    }

    @inline(__always)
    func handleMMIO(address: UInt64, length: Int, direction: VCPUExit.Direction, data: UnsafeMutableRawBufferPointer) {
        guard length >= 1, length <= 8, length <= data.count else { return }
        switch direction {
        case .write: mmioBus.write(address, size: length, value: Self.load(data, at: 0, size: length))
        case .read: Self.store(mmioBus.read(address, size: length), into: data, at: 0, size: length)
        }
    }

    /// Little-endian load of `size` bytes; the caller checked the range.
    @inline(__always)
    static func load(_ data: UnsafeMutableRawBufferPointer, at offset: Int, size: Int) -> UInt64 {
        var v: UInt64 = 0
        for i in 0..<size { v |= UInt64(data[offset + i]) << UInt64(8 * i) }
        return v
    }

    @inline(__always)
    static func store(_ value: UInt64, into data: UnsafeMutableRawBufferPointer, at offset: Int, size: Int) {
        for i in 0..<size { data[offset + i] = UInt8(truncatingIfNeeded: value >> UInt64(8 * i)) }
    }

    /// The instruction KVM failed to emulate: data[1]'s low byte is its length,
    /// the bytes follow (data[1] bytes 1-7, then data[2], up to 15 bytes).
    public static func failedInstruction(_ words: [UInt64]) -> [UInt8] {
        guard words.count >= 2 else { return [] }
        var bytes: [UInt8] = []
        for w in words[1...].prefix(2) {
            for i in 0..<8 { bytes.append(UInt8(truncatingIfNeeded: w >> UInt64(8 * i))) }
        }
        let length = min(Int(bytes[0]), 15, bytes.count - 1)
        return Array(bytes[1..<(1 + length)])
    }

    func handleEmulationFailure(_ words: [UInt64], vcpu: some VCPUControl) throws(VMMError) -> ExitAction {
        let instruction = Self.failedInstruction(words)
        if let extendedState, let decoded = ExtendedStateInstruction.decode(instruction) {
            do { _ = try extendedState.complete(decoded, vcpu: vcpu) } catch {
                throw .extendedState(vcpu: vcpu.id, rip: try? vcpu.registers().rip, instruction: instruction, reason: error.description)
            }
            return .resume
        }
        guard emulationAssists, let first = instruction.first, first == 0xCC || first == 0x9B else {
            throw .emulationFailure(vcpu: vcpu.id, rip: try? vcpu.registers().rip, instruction: instruction)
        }
        var regs = try kvm { () throws(KVMError) in try vcpu.registers() }
        // Both are one byte. int3 is a trap: the #BP it raises reports the address
        // after it, so advance first, then inject vector 3. fwait only waits for
        // pending x87 exceptions, and none can be pending where Linux runs it.
        regs.rip &+= 1
        try kvm { () throws(KVMError) in try vcpu.setRegisters(regs) }
        if first == 0xCC {
            try kvm { () throws(KVMError) in try vcpu.injectException(vector: 3) }
        }
        return .resume
    }

    @inline(__always)
    func kvm<T>(_ body: () throws(KVMError) -> T) throws(VMMError) -> T {
        do { return try body() } catch { throw .kvm(error) }
    }
}
