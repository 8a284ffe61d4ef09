/// Why KVM_RUN returned, decoded from kvm_run into a value that code (and
/// tests, without KVM) can switch over. Port and MMIO data stay in the run
/// page; `VCPU.withExitData` lends them to the handler.
public enum VCPUExit: Equatable, Sendable {
    public enum Direction: Equatable, Sendable { case read, write }

    /// Port I/O: `count` items of `size` bytes (count > 1 for string instructions).
    case io(port: UInt16, size: Int, count: Int, direction: Direction)
    /// MMIO access of `length` bytes at a guest-physical address with no RAM.
    case mmio(address: UInt64, length: Int, direction: Direction)
    case hlt
    /// The guest triple-faulted (or the host reports shutdown).
    case shutdown
    /// KVM_EXIT_SYSTEM_EVENT: type (KVM_SYSTEM_EVENT_SHUTDOWN=1, RESET=2, CRASH=3, ...) and data.
    case systemEvent(type: UInt32, data: [UInt64])
    /// KVM_EXIT_INTERNAL_ERROR with its suberror and data words.
    case internalError(suberror: UInt32, data: [UInt64])
    case failEntry(hardwareReason: UInt64, cpu: UInt32)
    /// KVM_RUN was interrupted by a signal or immediate_exit (a kick).
    case interrupted
    /// Any other exit reason, by number.
    case unhandled(reason: UInt32)

    public var name: String {
        switch self {
        case .io: return "KVM_EXIT_IO"
        case .mmio: return "KVM_EXIT_MMIO"
        case .hlt: return "KVM_EXIT_HLT"
        case .shutdown: return "KVM_EXIT_SHUTDOWN"
        case .systemEvent: return "KVM_EXIT_SYSTEM_EVENT"
        case .internalError: return "KVM_EXIT_INTERNAL_ERROR"
        case .failEntry: return "KVM_EXIT_FAIL_ENTRY"
        case .interrupted: return "KVM_EXIT_INTR"
        case let .unhandled(reason): return "exit reason \(reason)"
        }
    }
}
