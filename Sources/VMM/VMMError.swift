import GuestMemory
import KVM
import LinuxBoot

/// Everything that can stop Airlock's VMM, each with what to do about it.
public enum VMMError: Error, CustomStringConvertible, Sendable {
    case kvm(KVMError)
    case memory(GuestMemoryError)
    case boot(LinuxBootError)
    case bus(BusError)
    case invalidConfiguration(String)
    /// An exit the run loop has no handler for.
    case unhandledExit(name: String, vcpu: UInt32, rip: UInt64?)
    /// KVM could not emulate an instruction and no assist applies.
    case emulationFailure(vcpu: UInt32, rip: UInt64?, instruction: [UInt8])
    /// An extended-state instruction (XSAVE, XRSTOR, ...) Airlock completes for the guest could not be completed.
    case extendedState(vcpu: UInt32, rip: UInt64?, instruction: [UInt8], reason: String)
    case internalError(vcpu: UInt32, suberror: UInt32, data: [UInt64], rip: UInt64?)
    case entryFailed(vcpu: UInt32, hardwareReason: UInt64, rip: UInt64?)
    case thread(String)
    /// A saved machine state (from a snapshot) this machine cannot take back.
    case invalidState(String)

    static func hex(_ v: UInt64?) -> String { v.map { "0x" + String($0, radix: 16) } ?? "unknown" }

    public var description: String {
        switch self {
        case let .kvm(e): return e.description
        case let .memory(e): return "guest memory: \(e)"
        case let .boot(e): return e.description
        case let .bus(e): return "machine set-up: \(e)"
        case let .invalidConfiguration(m): return m
        case let .unhandledExit(name, vcpu, rip):
            return "vCPU \(vcpu) stopped on \(name) at RIP \(Self.hex(rip)), which Airlock does not handle: report this with the kernel you booted"
        case let .emulationFailure(vcpu, rip, bytes):
            let b = bytes.isEmpty ? "not reported" : bytes.map { String($0, radix: 16).leftPadded(2) }.joined(separator: " ")
            return "vCPU \(vcpu): KVM could not emulate the instruction at RIP \(Self.hex(rip)) (bytes: \(b)). On a PVM host, turn the CPU feature that uses it off on the kernel command line (clearcpuid=...)"
        case let .extendedState(vcpu, rip, bytes, reason):
            let b = bytes.map { String($0, radix: 16).leftPadded(2) }.joined(separator: " ")
            return "vCPU \(vcpu): the extended-state instruction at RIP \(Self.hex(rip)) (bytes: \(b)) could not be completed: \(reason). This is a bug in Airlock or an unexpected guest kernel: report it with the kernel you booted"
        case let .internalError(vcpu, sub, data, rip):
            return "vCPU \(vcpu): KVM internal error \(sub) at RIP \(Self.hex(rip)), data \(data.map { "0x" + String($0, radix: 16) })"
        case let .entryFailed(vcpu, reason, rip):
            return "vCPU \(vcpu): KVM could not enter the guest (hardware reason 0x\(String(reason, radix: 16))) at RIP \(Self.hex(rip))"
        case let .thread(m): return m
        case let .invalidState(m): return "the saved machine state does not fit: \(m)"
        }
    }
}

extension String {
    func leftPadded(_ width: Int, with pad: Character = "0") -> String {
        count >= width ? self : String(repeating: pad, count: width - count) + self
    }
}
