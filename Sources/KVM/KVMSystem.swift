import AirlockOS
import CAirlockShim
#if canImport(Glibc)
import Glibc
#endif

/// An open /dev/kvm: the system-wide KVM handle.
public final class KVMSystem: Sendable {
    public static let defaultPath = "/dev/kvm"
    public static let expectedAPIVersion: Int32 = 12

    let fd: OwnedFileDescriptor
    public let path: String
    public let apiVersion: Int32
    /// Size of each vCPU's kvm_run mapping.
    public let vcpuMapSize: Int

    /// The open /dev/kvm, to hand to a VMM process (valid while this object lives).
    public var fileDescriptor: Int32 { fd.rawValue }

    public init(path: String = KVMSystem.defaultPath) throws(KVMError) {
        self.path = path
        do {
            fd = try OwnedFileDescriptor.open(path, flags: O_RDWR)
        } catch {
            if error.errno == ENOENT { throw .deviceMissing(path: path) }
            throw .deviceNotAccessible(path: path, errno: error.errno)
        }
        (apiVersion, vcpuMapSize) = try Self.check(fd, path: path)
    }

    /// Adopts a /dev/kvm the caller opened (a supervisor hands the jailed VMM its descriptor);
    /// `path` names it in messages. Checked the same way: a descriptor that is not KVM (a
    /// /dev/null bound over /dev/kvm) is refused here, before any VM exists.
    public init(descriptor: OwnedFileDescriptor, path: String = KVMSystem.defaultPath) throws(KVMError) {
        self.path = path
        fd = descriptor
        (apiVersion, vcpuMapSize) = try Self.check(descriptor, path: path)
    }

    private static func check(_ fd: OwnedFileDescriptor, path: String) throws(KVMError) -> (Int32, Int) {
        let version = airlockIoctlVal(fd.rawValue, AIRLOCK_KVM_GET_API_VERSION, 0)
        if version < 0 {
            if errno == ENOTTY || errno == EINVAL { throw .notKVM(path: path) }
            throw .ioctl(SystemError("KVM_GET_API_VERSION", subject: path, errno: errno))
        }
        guard version == Self.expectedAPIVersion else { throw .unsupportedAPIVersion(version) }
        let mapSize = Int(try kvmIoctl(fd.rawValue, AIRLOCK_KVM_GET_VCPU_MMAP_SIZE, "KVM_GET_VCPU_MMAP_SIZE", value: 0))
        return (version, mapSize)
    }

    /// KVM_CHECK_EXTENSION: 0 when absent, otherwise a capability-specific value.
    public func checkExtension(_ capability: Int32) -> Int32 {
        (try? kvmIoctl(fd.rawValue, AIRLOCK_KVM_CHECK_EXTENSION, "KVM_CHECK_EXTENSION", value: UInt(capability))) ?? 0
    }

    /// The capabilities Airlock needs, with their names and whether this host has them.
    public func requiredCapabilities() -> [(name: String, present: Bool)] {
        Self.required.map { ($0.name, checkExtension($0.cap) > 0) }
    }

    static let required: [(name: String, cap: Int32)] = [
        ("KVM_CAP_USER_MEMORY", AIRLOCK_KVM_CAP_USER_MEMORY),
        ("KVM_CAP_IRQCHIP", AIRLOCK_KVM_CAP_IRQCHIP),
        ("KVM_CAP_PIT2", AIRLOCK_KVM_CAP_PIT2),
        ("KVM_CAP_SET_TSS_ADDR", AIRLOCK_KVM_CAP_SET_TSS_ADDR),
        ("KVM_CAP_EXT_CPUID", AIRLOCK_KVM_CAP_EXT_CPUID),
        ("KVM_CAP_IMMEDIATE_EXIT", AIRLOCK_KVM_CAP_IMMEDIATE_EXIT),
        ("KVM_CAP_VCPU_EVENTS", AIRLOCK_KVM_CAP_VCPU_EVENTS),
        ("KVM_CAP_IOEVENTFD", AIRLOCK_KVM_CAP_IOEVENTFD),
        ("KVM_CAP_IRQFD", AIRLOCK_KVM_CAP_IRQFD),
    ]

    /// Throws naming the first required capability the host lacks.
    public func checkRequiredCapabilities() throws(KVMError) {
        for (name, present) in requiredCapabilities() where !present { throw .missingCapability(name) }
    }

    /// KVM_GET_SUPPORTED_CPUID: the CPUID leaves KVM can present to a guest.
    public func supportedCPUID() throws(KVMError) -> CPUIDTable {
        var table = airlock_cpuid()
        table.nent = UInt32(AIRLOCK_MAX_CPUID_ENTRIES)
        _ = try withUnsafeMutableBytes(of: &table) { (p) throws(KVMError) -> Int32 in
            try kvmIoctl(fd.rawValue, AIRLOCK_KVM_GET_SUPPORTED_CPUID, "KVM_GET_SUPPORTED_CPUID", p.baseAddress)
        }
        return CPUIDTable(table)
    }

    public func createVM() throws(KVMError) -> VirtualMachine {
        let vmfd = try kvmIoctl(fd.rawValue, AIRLOCK_KVM_CREATE_VM, "KVM_CREATE_VM", value: 0)
        return VirtualMachine(fd: OwnedFileDescriptor(adopting: vmfd), system: self)
    }
}

/// One CPUID leaf as KVM describes it.
public struct CPUIDEntry: Equatable, Sendable {
    public var function: UInt32
    public var index: UInt32
    public var flags: UInt32
    public var eax: UInt32
    public var ebx: UInt32
    public var ecx: UInt32
    public var edx: UInt32

    public init(function: UInt32, index: UInt32 = 0, flags: UInt32 = 0, eax: UInt32 = 0, ebx: UInt32 = 0, ecx: UInt32 = 0, edx: UInt32 = 0) {
        self.function = function; self.index = index; self.flags = flags
        self.eax = eax; self.ebx = ebx; self.ecx = ecx; self.edx = edx
    }
}

/// The CPUID table given to KVM_SET_CPUID2, as plain Swift values so the
/// machine builder can edit it and tests can inspect it.
public struct CPUIDTable: Equatable, Sendable {
    public var entries: [CPUIDEntry]

    public init(entries: [CPUIDEntry]) { self.entries = entries }

    init(_ raw: airlock_cpuid) {
        var raw = raw
        let count = min(Int(raw.nent), Int(AIRLOCK_MAX_CPUID_ENTRIES))
        entries = withUnsafeBytes(of: &raw.entries) { p in
            let e = p.bindMemory(to: kvm_cpuid_entry2.self)
            return (0..<count).map { i in
                CPUIDEntry(function: e[i].function, index: e[i].index, flags: e[i].flags,
                           eax: e[i].eax, ebx: e[i].ebx, ecx: e[i].ecx, edx: e[i].edx)
            }
        }
    }

    var raw: airlock_cpuid {
        var raw = airlock_cpuid()
        let count = min(entries.count, Int(AIRLOCK_MAX_CPUID_ENTRIES))
        raw.nent = UInt32(count)
        withUnsafeMutableBytes(of: &raw.entries) { p in
            let e = p.bindMemory(to: kvm_cpuid_entry2.self)
            for i in 0..<count {
                let s = entries[i]
                e[i] = kvm_cpuid_entry2(function: s.function, index: s.index, flags: s.flags,
                                        eax: s.eax, ebx: s.ebx, ecx: s.ecx, edx: s.edx, padding: (0, 0, 0))
            }
        }
        return raw
    }

    /// Applies `body` to every entry for leaf `function` (all sub-leaves).
    public mutating func modify(function: UInt32, _ body: (inout CPUIDEntry) -> Void) {
        for i in entries.indices where entries[i].function == function { body(&entries[i]) }
    }
}
