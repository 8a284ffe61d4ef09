/// How a guest ended: every path (i8042 reset, triple fault, KVM system event,
/// a halt that can never wake) becomes one of these.
public struct SystemEvent: Equatable, Sendable, CustomStringConvertible {
    public enum Kind: String, Equatable, Sendable {
        /// The guest powered itself off.
        case shutdown
        /// The guest rebooted (Airlock guests reboot to end: reboot=k).
        case reset
        /// The guest stopped in a way only a fault explains.
        case crash
    }

    public enum Cause: Equatable, Sendable {
        /// 0xFE written to the i8042 command port (Linux's reboot=k).
        case i8042Reset
        /// KVM_EXIT_SHUTDOWN: the guest triple-faulted.
        case tripleFault(rip: UInt64?)
        /// KVM_EXIT_SYSTEM_EVENT with its type and data words.
        case kvmSystemEvent(type: UInt32, data: [UInt64])
        /// HLT with interrupts disabled and nothing pending: nothing can ever wake the vCPU.
        case haltedForever(rip: UInt64)
    }

    public let kind: Kind
    public let cause: Cause
    public let vcpu: UInt32

    public init(kind: Kind, cause: Cause, vcpu: UInt32) {
        self.kind = kind
        self.cause = cause
        self.vcpu = vcpu
    }

    /// Maps KVM_SYSTEM_EVENT_* types to a kind: 1 shutdown, 2 reset, 3 crash;
    /// the others (wakeup, suspend, SEV termination) end the guest as crashes.
    public static func fromKVM(type: UInt32, data: [UInt64], vcpu: UInt32) -> SystemEvent {
        let kind: Kind
        switch type {
        case 1: kind = .shutdown
        case 2: kind = .reset
        default: kind = .crash
        }
        return SystemEvent(kind: kind, cause: .kvmSystemEvent(type: type, data: data), vcpu: vcpu)
    }

    public var description: String {
        let detail: String
        switch cause {
        case .i8042Reset: detail = "i8042 reset command (0xFE written to port 0x64)"
        case let .tripleFault(rip):
            detail = "triple fault (KVM_EXIT_SHUTDOWN)" + (rip.map { " at RIP 0x\(String($0, radix: 16))" } ?? "")
        case let .kvmSystemEvent(type, data):
            let names: [UInt32: String] = [1: "SHUTDOWN", 2: "RESET", 3: "CRASH", 4: "WAKEUP", 5: "SUSPEND", 6: "SEV_TERM"]
            let words = data.map { "0x" + String($0, radix: 16) }.joined(separator: " ")
            detail = "KVM_SYSTEM_EVENT_\(names[type] ?? String(type))" + (words.isEmpty ? "" : " data \(words)")
        case let .haltedForever(rip):
            detail = "HLT with interrupts disabled and nothing pending at RIP 0x\(String(rip, radix: 16))"
        }
        return "\(kind.rawValue) on vCPU \(vcpu): \(detail)"
    }
}
