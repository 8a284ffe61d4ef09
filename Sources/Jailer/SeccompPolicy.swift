import CAirlockShim
#if canImport(Glibc)
import Glibc
#endif

/// The seccomp policy, kept as data to review: one allowlist per thread role,
/// a reason for every entry, and argument filters where an argument decides
/// what the call can do. Anything not listed ends the VMM (see `Seccomp`).
///
/// Filters stack: a vCPU thread is created under the main filter and then
/// adds its own, and a call must pass both. So the main list is the ceiling
/// for the whole process after set-up (it includes what the vCPU threads do,
/// such as KVM_RUN), and the vCPU list is the narrower floor for the threads
/// that run guest code and touch guest-controlled data all the time.
///
/// The lists were derived with `strace -f` on `airlock boot` (a full boot to
/// the guest's reboot): every call after the machine is built appears here,
/// and nothing that did not appear, except where a reason says why.
public enum SeccompPolicy {
    public static func rules(for role: ThreadRole) -> [SyscallRule] {
        switch role {
        case .main: return main
        case .vcpu: return vcpu
        }
    }

    /// KVM requests a vCPU thread makes after set-up.
    public static let vcpuKVMRequests: [KVMRequest] = [
        .run,                                    // entering the guest
        .getRegs, .setRegs,                      // exit handling: HLT checks, PVM emulation assists (int3, fwait) advance RIP
        .getVCPUEvents, .setVCPUEvents,          // is an interrupt pending on HLT; inject #BP for the int3 assist
        .irqLine,                                // device interrupts raised by MMIO/PIO writes handled on this thread
        // The PVM XSAVE assist (ExtendedStateAssist): control registers, CPL and segment bases
        // to walk the guest's page tables, and the vCPU's extended state and XCR0, which XSAVE
        // copies out and XRSTOR replaces (a #PF it raises carries CR2 in KVM_SET_VCPU_EVENTS).
        .getSregs, .getXSAVE, .getXSAVE2, .setXSAVE, .getXCRS,
    ]

    /// KVM requests any thread makes after set-up: the vCPU list, and saving a
    /// snapshot. vCPU threads inherit this filter, and the threads that
    /// deliver host input raise interrupts with KVM_IRQ_LINE, which the vCPU
    /// list already has.
    public static let mainKVMRequests: [KVMRequest] = vcpuKVMRequests + snapshotKVMRequests

    // MARK: Snapshots (issue 15)
    // A sandbox that saves a snapshot gets the session's `snapshot` request after its boot:
    // the controller (main) thread pauses the VM and reads every piece of KVM state, after
    // the filters are on, and writes it into the one file the request brought as a
    // descriptor. Only reads of KVM state: a restore builds its VM and sets its state
    // while the VMM handles `boot`, before any filter is installed, so snapshots add no
    // KVM_SET_* request to the filters. The vCPU list needs nothing new (stopping a vCPU
    // for a save completes its last exit with one more KVM_RUN, which it has). The guest's
    // fresh clock and randomness come from the supervisor in each run request, so the
    // VMM draws none itself.

    /// KVM requests the controller makes to save a paused VM, beyond the vCPU
    /// list's (which already has KVM_GET_REGS, KVM_GET_SREGS, KVM_GET_XSAVE(2),
    /// KVM_GET_XCRS and KVM_GET_VCPU_EVENTS, read for the XSAVE assist and exits).
    public static let snapshotKVMRequests: [KVMRequest] = [
        .getLAPIC,                               // the local APIC's registers
        .getMPState,                             // runnable or halted
        .getDebugRegisters,                      // DR0-DR7
        .getMSRs,                                // every MSR KVM lists, and the host profile's (PVM's VIF)
        .getTSCKHz,                              // the TSC rate a restore must match
        .getIRQChip,                             // the PICs and the IOAPIC
        .getPIT2,                                // the PIT's channels
        .getClock,                               // kvmclock, which a restore sets back
    ]

    /// System calls of a snapshot save, beyond the run's (in the main list).
    static let snapshotRules: [SyscallRule] = [
        SyscallRule("mincore", "a snapshot save asks which guest pages are resident, so untouched ones are never read or written"),
        SyscallRule("ftruncate", "a snapshot save sizes its file (the descriptor the supervisor sent with the request) to hold the RAM image as holes"),
    ]
    // MARK: end of the snapshot block

    static let main: [SyscallRule] = [
        SyscallRule("read", "host input for the guest, read from descriptors the supervisor passed (console ports)"),
        SyscallRule("write", "guest console output and logs to the declared descriptors; the SIGSYS report"),
        SyscallRule("pread64", "virtio-blk reads from disk images (on vCPU threads, which inherit this filter)"),
        SyscallRule("pwrite64", "virtio-blk writes to writable disk images (vCPU threads)"),
        SyscallRule("fsync", "virtio-blk FLUSH (vCPU threads)"),
        SyscallRule("close", "tear-down closes the KVM, VM, vCPU and image descriptors"),
        SyscallRule("ioctl", "KVM only, and only the requests listed", .kvmRequests(mainKVMRequests)),
        SyscallRule("mmap", "malloc arenas and thread stacks; never executable memory", .withoutProtExec),
        SyscallRule("mprotect", "malloc arena growth and thread-stack guard pages; never executable", .withoutProtExec),
        SyscallRule("munmap", "freeing malloc chunks, thread stacks, guest RAM and kvm_run at tear-down"),
        SyscallRule("madvise", "glibc releases an exiting thread's stack (MADV_DONTNEED) and trims malloc"),
        SyscallRule("brk", "malloc's main arena"),
        SyscallRule("futex", "locks, semaphores, condition variables and pthread_join"),
        SyscallRule("clone", "starting vCPU threads; CLONE_THREAD is required, so no new process", .cloneThreadOnly),
        SyscallRule("clone3", "refused with ENOSYS so glibc falls back to clone, whose flags a filter can read (clone3 passes them in memory)", action: .errno(ENOSYS)),
        SyscallRule("set_robust_list", "glibc registers each new thread's robust-futex list"),
        SyscallRule("rseq", "glibc registers restartable sequences for each new thread"),
        SyscallRule("rt_sigaction", "the vCPU kick handler (SIGUSR2) and glibc's set-up of its internal signal on the first pthread_create; never SIGSYS, so the violation report cannot be replaced", .signalOtherThan(SIGSYS)),
        SyscallRule("rt_sigprocmask", "pthread_create blocks signals around clone; vCPU threads unblock the kick; exiting threads block all"),
        SyscallRule("rt_sigreturn", "returning from the kick signal's handler"),
        SyscallRule("tgkill", "the kick that interrupts KVM_RUN (pthread_kill), and abort()"),
        SyscallRule("getpid", "pthread_kill names the process in tgkill"),
        SyscallRule("gettid", "lock ownership and the SIGSYS report"),
        SyscallRule("exit", "a thread ending"),
        SyscallRule("exit_group", "the process ending, including the SIGSYS report's exit"),
        SyscallRule("clock_gettime", "timeouts and timings; the vDSO falls back to the syscall when the clocksource cannot be read from user space"),
        SyscallRule("seccomp", "each vCPU thread adds its own (narrower) filter; only SET_MODE_FILTER without flags", .seccompFilterOnly),
        SyscallRule("poll", "the stdin feeder waits for input with a timeout, so that it sees the run end; the session socket's reader"),
        SyscallRule("recvmsg", "the supervisor's session requests, and the descriptors a run comes with (its stdin, stdout, stderr)"),
        SyscallRule("sendmsg", "replies to the supervisor on the session socket (never with descriptors)"),
    ] + snapshotRules

    static let vcpu: [SyscallRule] = [
        SyscallRule("write", "guest console output (UART, virtio-console) and logs; the SIGSYS report"),
        SyscallRule("pread64", "virtio-blk reads, handled on the vCPU thread that notified the queue"),
        SyscallRule("pwrite64", "virtio-blk writes to writable disk images"),
        SyscallRule("fsync", "virtio-blk FLUSH"),
        SyscallRule("ioctl", "KVM only, and only the requests listed", .kvmRequests(vcpuKVMRequests)),
        SyscallRule("mmap", "this thread's malloc arena; never executable memory", .withoutProtExec),
        SyscallRule("mprotect", "malloc arena growth; never executable", .withoutProtExec),
        SyscallRule("munmap", "malloc arena trimming"),
        SyscallRule("madvise", "glibc releases the thread's stack as it exits"),
        SyscallRule("brk", "malloc's main arena, when this thread allocates there"),
        SyscallRule("futex", "locks shared with the main thread (run state, device state)"),
        SyscallRule("rt_sigprocmask", "glibc blocks signals as the thread exits"),
        SyscallRule("rt_sigreturn", "returning from the kick signal's handler"),
        SyscallRule("tgkill", "a vCPU that ends the run kicks the other vCPUs (and itself); abort()"),
        SyscallRule("getpid", "pthread_kill names the process in tgkill"),
        SyscallRule("gettid", "lock ownership and the SIGSYS report"),
        SyscallRule("exit", "the thread ending"),
        SyscallRule("exit_group", "the SIGSYS report's exit, and a fatal error"),
        SyscallRule("clock_gettime", "timings (first KVM_RUN); the vDSO's fallback"),
    ]
}

/// The threads that install a filter.
public enum ThreadRole: String, Sendable, CaseIterable {
    /// The main thread, installed before any thread that touches guest data
    /// starts; every thread created afterwards inherits it.
    case main
    /// A vCPU thread, installed at its start before the first KVM_RUN.
    case vcpu

    /// A C string with static lifetime, for the SIGSYS report.
    var cName: StaticString {
        switch self {
        case .main: return "main"
        case .vcpu: return "vcpu"
        }
    }
}

/// One allowed (or specially answered) system call.
public struct SyscallRule: Sendable, Equatable {
    public enum Action: Sendable, Equatable {
        case allow
        /// Fail with this errno instead of ending the VMM (clone3 -> ENOSYS).
        case errno(Int32)
    }

    /// The name libseccomp resolves (x86-64).
    public let name: String
    /// Why the VMM needs it, for review.
    public let reason: String
    public let filter: ArgumentFilter
    public let action: Action

    init(_ name: String, _ reason: String, _ filter: ArgumentFilter = .none, action: Action = .allow) {
        self.name = name
        self.reason = reason
        self.filter = filter
        self.action = action
    }
}

/// What a rule checks in the arguments.
public enum ArgumentFilter: Sendable, Equatable {
    case none
    /// ioctl: the request (argument 1, compared as the kernel does, on its
    /// low 32 bits) is one of these.
    case kvmRequests([KVMRequest])
    /// mmap, mprotect: the protection (argument 2) lacks PROT_EXEC, so no
    /// code can be made at run time.
    case withoutProtExec
    /// clone: the flags (argument 0) include CLONE_THREAD.
    case cloneThreadOnly
    /// rt_sigaction: the signal (argument 0) is not this one.
    case signalOtherThan(Int32)
    /// seccomp: operation (argument 0) SECCOMP_SET_MODE_FILTER, flags (argument 1) 0.
    case seccompFilterOnly
}

/// The KVM ioctl requests the policy can name, with their numbers from linux/kvm.h.
public enum KVMRequest: String, Sendable, CaseIterable {
    case run = "KVM_RUN"
    case getRegs = "KVM_GET_REGS"
    case setRegs = "KVM_SET_REGS"
    case getSregs = "KVM_GET_SREGS"
    case setSregs = "KVM_SET_SREGS"
    case getVCPUEvents = "KVM_GET_VCPU_EVENTS"
    case setVCPUEvents = "KVM_SET_VCPU_EVENTS"
    case irqLine = "KVM_IRQ_LINE"
    case createVM = "KVM_CREATE_VM"
    case createVCPU = "KVM_CREATE_VCPU"
    case setUserMemoryRegion = "KVM_SET_USER_MEMORY_REGION"
    case getAPIVersion = "KVM_GET_API_VERSION"
    case getXSAVE = "KVM_GET_XSAVE"
    case getXSAVE2 = "KVM_GET_XSAVE2"
    case setXSAVE = "KVM_SET_XSAVE"
    case getXCRS = "KVM_GET_XCRS"
    // Snapshot saves (see `SeccompPolicy.snapshotKVMRequests`).
    case getLAPIC = "KVM_GET_LAPIC"
    case getMPState = "KVM_GET_MP_STATE"
    case getDebugRegisters = "KVM_GET_DEBUGREGS"
    case getMSRs = "KVM_GET_MSRS"
    case getTSCKHz = "KVM_GET_TSC_KHZ"
    case getIRQChip = "KVM_GET_IRQCHIP"
    case getPIT2 = "KVM_GET_PIT2"
    case getClock = "KVM_GET_CLOCK"

    public var number: UInt {
        switch self {
        case .run: return AIRLOCK_KVM_RUN
        case .getRegs: return AIRLOCK_KVM_GET_REGS
        case .setRegs: return AIRLOCK_KVM_SET_REGS
        case .getSregs: return AIRLOCK_KVM_GET_SREGS
        case .setSregs: return AIRLOCK_KVM_SET_SREGS
        case .getVCPUEvents: return AIRLOCK_KVM_GET_VCPU_EVENTS
        case .setVCPUEvents: return AIRLOCK_KVM_SET_VCPU_EVENTS
        case .irqLine: return AIRLOCK_KVM_IRQ_LINE
        case .createVM: return AIRLOCK_KVM_CREATE_VM
        case .createVCPU: return AIRLOCK_KVM_CREATE_VCPU
        case .setUserMemoryRegion: return AIRLOCK_KVM_SET_USER_MEMORY_REGION
        case .getAPIVersion: return AIRLOCK_KVM_GET_API_VERSION
        case .getXSAVE: return AIRLOCK_KVM_GET_XSAVE
        case .getXSAVE2: return AIRLOCK_KVM_GET_XSAVE2
        case .setXSAVE: return AIRLOCK_KVM_SET_XSAVE
        case .getXCRS: return AIRLOCK_KVM_GET_XCRS
        case .getLAPIC: return AIRLOCK_KVM_GET_LAPIC
        case .getMPState: return AIRLOCK_KVM_GET_MP_STATE
        case .getDebugRegisters: return AIRLOCK_KVM_GET_DEBUGREGS
        case .getMSRs: return AIRLOCK_KVM_GET_MSRS
        case .getTSCKHz: return AIRLOCK_KVM_GET_TSC_KHZ
        case .getIRQChip: return AIRLOCK_KVM_GET_IRQCHIP
        case .getPIT2: return AIRLOCK_KVM_GET_PIT2
        case .getClock: return AIRLOCK_KVM_GET_CLOCK
        }
    }
}
