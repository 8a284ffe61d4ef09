import CAirlockShim
import KVM

/// The PVM host's paravirtual interface as the VMM uses it: a probe for its
/// signature MSR and the registration of the guest's first VIF page before the
/// first KVM_RUN, so that the guest kernel runs natively from its first
/// instruction. What each value means, and which probe settled it, is in
/// guest-kernel/probes/README.md.
public enum PVInterface {
    /// VIF page address | flags; reads 0x400 before anything registered.
    public static let vifMSR: UInt32 = 0x4b56_4d10
    /// Reads "PVM" where the interface exists; KVM_GET_MSRS reads nothing elsewhere.
    public static let signatureMSR: UInt32 = 0x4b56_4d11
    public static let signature: UInt64 = 0x4d_5650
    /// The host accepts a VMM-side (KVM_SET_MSRS) registration only with this flag;
    /// a guest's own wrmsr works without it.
    public static let hostRegistrationFlag: UInt64 = 0x400

    /// Whether the vCPU's host answers the signature MSR (one KVM_GET_MSRS, a few microseconds).
    public static func probe(_ vcpu: VCPU) -> Bool {
        guard let read = try? vcpu.msrs([signatureMSR]), let first = read.first else { return false }
        return first.index == signatureMSR && first.value == signature
    }

    /// Probes the interface from a throwaway VM and vCPU (for `airlock doctor`; a
    /// machine probes its own vCPU instead). About a millisecond.
    public static func probe(kvm: KVMSystem) -> Bool {
        guard let vm = try? kvm.createVM(), let vcpu = try? vm.createVCPU(id: 0) else { return false }
        return probe(vcpu)
    }

    /// Whether Airlock's guest kernel can run in PV mode on this host: it keeps the user's GS
    /// base live in kernel mode there and moves it with rdgsbase/wrgsbase, which run at
    /// hardware ring 3 under the host's CR4, so what counts is whether the host kernel lets
    /// user mode use them: `AT_HWCAP2`'s FSGSBASE bit (Linux sets it with CR4.FSGSBASE).
    /// KVM_GET_SUPPORTED_CPUID is no guide: this host's leaves out FSGSBASE while the guest,
    /// whose CPUID is not filtered, sees the CPU's. Without it the kernel stays emulated
    /// (guest-kernel/patches/0010), so the VMM must not start it natively either.
    public static func cpuSuitsGuestKernel(hwcap2: UInt = airlock_hwcap2()) -> Bool {
        hwcap2 & hwcap2FSGSBASE != 0
    }

    /// HWCAP2_FSGSBASE (linux/arch/x86/include/uapi/asm/hwcap2.h).
    static let hwcap2FSGSBASE: UInt = 1 << 1

    /// Registers `page` (guest-physical, page-aligned) as the vCPU's VIF page; false if the host refused.
    public static func register(_ vcpu: VCPU, page: UInt64) throws(KVMError) -> Bool {
        precondition(page & 0xFFF == 0, "the VIF page must be page-aligned")
        return try vcpu.setMSRs([(vifMSR, page | hostRegistrationFlag)]) == 1
    }

    /// The VIF page the vCPU has registered now (flags masked off), nil if none or unreadable.
    public static func registeredPage(_ vcpu: VCPU) -> UInt64? {
        guard let read = try? vcpu.msrs([vifMSR]), let first = read.first, first.index == vifMSR else { return nil }
        let page = first.value & ~0xFFF
        return page == 0 ? nil : page
    }

    /// The selectors the host reports for each mode (KVM_GET_SREGS): kernel mode 0x10/0x18 with
    /// DPL 0, user mode 0x33/0x2b with DPL 3 (../shared/docs/kvm-on-this-host.md).
    static let kernelCS: UInt16 = 0x10, kernelSS: UInt16 = 0x18

    /// A saved vCPU of a PV-mode guest, with the mode the host will take from its
    /// segments made right. The host reports a vCPU stopped inside the halt hypercall
    /// (the guest's idle loop, where every snapshot is taken: the agent waits in a read)
    /// with the user-mode selectors, 0x33/0x2b, though it runs kernel code; a restore
    /// that sets those makes the host deliver the next interrupt as one from user mode,
    /// which the guest kernel takes for a return to user mode from its idle task (a
    /// warning in fpregs_restore_userregs, then often a crash). Linux runs user code
    /// only in the lower half of the address space, so a RIP in the upper half is
    /// kernel mode: CS and SS get the kernel's selectors and DPL 0 (every other
    /// attribute is the same for both).
    public static func settleKernelMode(_ state: inout VCPUState) {
        guard state.regs.count >= 144, state.sregs.count >= 144 else { return }
        let rip = (0..<8).reduce(UInt64(0)) { $0 | UInt64(state.regs[128 + $1]) << (8 * $1) }
        guard rip >> 63 == 1 else { return }
        // struct kvm_sregs starts with cs, ds, es, fs, gs, ss (struct kvm_segment, 24 bytes
        // each: base u64, limit u32, selector u16, type, present, dpl, ...).
        for (offset, selector) in [(0, kernelCS), (5 * 24, kernelSS)] {
            state.sregs[offset + 12] = UInt8(selector & 0xFF)
            state.sregs[offset + 13] = UInt8(selector >> 8)
            state.sregs[offset + 16] = 0
        }
    }
}
