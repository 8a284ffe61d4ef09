import AirlockOS
import CAirlockShim
#if canImport(Glibc)
import Glibc
#endif

/// A KVM virtual machine file descriptor.
public final class VirtualMachine: Sendable {
    let fd: OwnedFileDescriptor
    public let system: KVMSystem

    init(fd: OwnedFileDescriptor, system: KVMSystem) {
        self.fd = fd
        self.system = system
    }

    /// KVM_SET_TSS_ADDR: three pages of guest-physical space KVM uses for the
    /// real-mode TSS on Intel hosts; must not overlap RAM or devices.
    public func setTSSAddress(_ address: UInt64) throws(KVMError) {
        _ = try kvmIoctl(fd.rawValue, AIRLOCK_KVM_SET_TSS_ADDR, "KVM_SET_TSS_ADDR", value: UInt(address))
    }

    /// KVM_SET_IDENTITY_MAP_ADDR: one page for the EPT identity map on Intel hosts.
    public func setIdentityMapAddress(_ address: UInt64) throws(KVMError) {
        var a = address
        _ = try kvmIoctl(fd.rawValue, AIRLOCK_KVM_SET_IDENTITY_MAP_ADDR, "KVM_SET_IDENTITY_MAP_ADDR", &a)
    }

    /// KVM_CREATE_IRQCHIP: in-kernel PIC, IOAPIC and local APICs.
    public func createIRQChip() throws(KVMError) {
        _ = try kvmIoctl(fd.rawValue, AIRLOCK_KVM_CREATE_IRQCHIP, "KVM_CREATE_IRQCHIP", value: 0)
    }

    /// KVM_CREATE_PIT2 with a dummy speaker port (no host sound path to expose).
    public func createPIT2() throws(KVMError) {
        var config = kvm_pit_config()
        config.flags = UInt32(KVM_PIT_SPEAKER_DUMMY)
        _ = try kvmIoctl(fd.rawValue, AIRLOCK_KVM_CREATE_PIT2, "KVM_CREATE_PIT2", &config)
    }

    /// KVM_ENABLE_CAP(KVM_CAP_EXCEPTION_PAYLOAD): lets the VMM queue a #PF with its CR2
    /// (`VCPU.injectPageFault`) without rewriting the special registers.
    public func enableExceptionPayload() throws(KVMError) {
        guard airlockIoctlVal(fd.rawValue, AIRLOCK_KVM_CHECK_EXTENSION, UInt(AIRLOCK_KVM_CAP_EXCEPTION_PAYLOAD)) > 0 else {
            throw .missingCapability("KVM_CAP_EXCEPTION_PAYLOAD")
        }
        var cap = kvm_enable_cap()
        cap.cap = UInt32(AIRLOCK_KVM_CAP_EXCEPTION_PAYLOAD)
        cap.args.0 = 1
        _ = try kvmIoctl(fd.rawValue, AIRLOCK_KVM_ENABLE_CAP, "KVM_ENABLE_CAP(KVM_CAP_EXCEPTION_PAYLOAD)", &cap)
    }

    /// KVM_SET_USER_MEMORY_REGION for one slot.
    public func setUserMemoryRegion(slot: UInt32, guestAddress: UInt64, size: UInt64, hostAddress: UInt64) throws(KVMError) {
        var region = kvm_userspace_memory_region(slot: slot, flags: 0, guest_phys_addr: guestAddress,
                                                 memory_size: size, userspace_addr: hostAddress)
        _ = try kvmIoctl(fd.rawValue, AIRLOCK_KVM_SET_USER_MEMORY_REGION, "KVM_SET_USER_MEMORY_REGION", &region)
    }

    /// KVM_IRQ_LINE: sets the level of an interrupt controller input.
    public func setIRQLine(_ irq: UInt32, high: Bool) throws(KVMError) {
        var level = kvm_irq_level()
        level.irq = irq
        level.level = high ? 1 : 0
        _ = try kvmIoctl(fd.rawValue, AIRLOCK_KVM_IRQ_LINE, "KVM_IRQ_LINE", &level)
    }

    public func createVCPU(id: UInt32) throws(KVMError) -> VCPU {
        let vcpufd = try kvmIoctl(fd.rawValue, AIRLOCK_KVM_CREATE_VCPU, "KVM_CREATE_VCPU", value: UInt(id))
        let owned = OwnedFileDescriptor(adopting: vcpufd)
        let runPage: MemoryMapping
        do {
            runPage = try MemoryMapping.shared(fd: vcpufd, length: system.vcpuMapSize, what: "kvm_run of vCPU \(id)")
        } catch { throw .ioctl(error) }
        // KVM_CAP_XSAVE2 on the VM gives the size of KVM_GET_XSAVE2's buffer (it grows with
        // the features the VM may use); 0 means the kernel only has the 4 KiB KVM_GET_XSAVE.
        let xsaveSize = Int(max(0, airlockIoctlVal(fd.rawValue, AIRLOCK_KVM_CHECK_EXTENSION, UInt(AIRLOCK_KVM_CAP_XSAVE2))))
        return VCPU(id: id, fd: owned, runPage: runPage, xsaveSize: xsaveSize)
    }
}
