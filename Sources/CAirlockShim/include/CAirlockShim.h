// The C surface Airlock needs from Linux that Swift cannot import directly:
// KVM ioctl request numbers (function-like macros in linux/kvm.h), structs with
// flexible array members given a fixed capacity, and non-variadic ioctl wrappers.
#ifndef AIRLOCK_SHIM_H
#define AIRLOCK_SHIM_H

#include <linux/kvm.h>
#include <stdint.h>
#include <signal.h>
#include <sys/auxv.h>
#include <sys/ioctl.h>
#include <sys/random.h>
#include <sys/types.h>
#include <unistd.h>

// AT_HWCAP2: the CPU features the host kernel enabled for user mode (bit 1, FSGSBASE,
// follows CR4.FSGSBASE). Glibc's module for Swift leaves sys/auxv.h out.
static inline unsigned long airlock_hwcap2(void) { return getauxval(AT_HWCAP2); }

// ioctl(2) is variadic, which Swift cannot call; these two cover every KVM use.
static inline int airlock_ioctl_ptr(int fd, unsigned long request, void *arg) {
    return ioctl(fd, request, arg);
}
static inline int airlock_ioctl_val(int fd, unsigned long request, unsigned long arg) {
    return ioctl(fd, request, arg);
}

// Request numbers, evaluated here because Swift does not import _IO/_IOW macros.
static const unsigned long AIRLOCK_KVM_GET_API_VERSION = KVM_GET_API_VERSION;
static const unsigned long AIRLOCK_KVM_CREATE_VM = KVM_CREATE_VM;
static const unsigned long AIRLOCK_KVM_CHECK_EXTENSION = KVM_CHECK_EXTENSION;
static const unsigned long AIRLOCK_KVM_GET_VCPU_MMAP_SIZE = KVM_GET_VCPU_MMAP_SIZE;
static const unsigned long AIRLOCK_KVM_GET_SUPPORTED_CPUID = KVM_GET_SUPPORTED_CPUID;
static const unsigned long AIRLOCK_KVM_GET_MSR_INDEX_LIST = KVM_GET_MSR_INDEX_LIST;
static const unsigned long AIRLOCK_KVM_SET_USER_MEMORY_REGION = KVM_SET_USER_MEMORY_REGION;
static const unsigned long AIRLOCK_KVM_SET_TSS_ADDR = KVM_SET_TSS_ADDR;
static const unsigned long AIRLOCK_KVM_SET_IDENTITY_MAP_ADDR = KVM_SET_IDENTITY_MAP_ADDR;
static const unsigned long AIRLOCK_KVM_CREATE_IRQCHIP = KVM_CREATE_IRQCHIP;
static const unsigned long AIRLOCK_KVM_CREATE_PIT2 = KVM_CREATE_PIT2;
static const unsigned long AIRLOCK_KVM_IRQ_LINE = KVM_IRQ_LINE;
static const unsigned long AIRLOCK_KVM_CREATE_VCPU = KVM_CREATE_VCPU;
static const unsigned long AIRLOCK_KVM_RUN = KVM_RUN;
static const unsigned long AIRLOCK_KVM_GET_REGS = KVM_GET_REGS;
static const unsigned long AIRLOCK_KVM_SET_REGS = KVM_SET_REGS;
static const unsigned long AIRLOCK_KVM_GET_SREGS = KVM_GET_SREGS;
static const unsigned long AIRLOCK_KVM_SET_SREGS = KVM_SET_SREGS;
static const unsigned long AIRLOCK_KVM_SET_CPUID2 = KVM_SET_CPUID2;
static const unsigned long AIRLOCK_KVM_SET_MSRS = KVM_SET_MSRS;
static const unsigned long AIRLOCK_KVM_GET_MSRS = KVM_GET_MSRS;
static const unsigned long AIRLOCK_KVM_GET_FPU = KVM_GET_FPU;
static const unsigned long AIRLOCK_KVM_SET_FPU = KVM_SET_FPU;
static const unsigned long AIRLOCK_KVM_GET_LAPIC = KVM_GET_LAPIC;
static const unsigned long AIRLOCK_KVM_SET_LAPIC = KVM_SET_LAPIC;
static const unsigned long AIRLOCK_KVM_GET_VCPU_EVENTS = KVM_GET_VCPU_EVENTS;
static const unsigned long AIRLOCK_KVM_SET_VCPU_EVENTS = KVM_SET_VCPU_EVENTS;
static const unsigned long AIRLOCK_KVM_GET_XSAVE = KVM_GET_XSAVE;
static const unsigned long AIRLOCK_KVM_GET_XSAVE2 = KVM_GET_XSAVE2;
static const unsigned long AIRLOCK_KVM_SET_XSAVE = KVM_SET_XSAVE;
static const unsigned long AIRLOCK_KVM_GET_XCRS = KVM_GET_XCRS;
static const unsigned long AIRLOCK_KVM_ENABLE_CAP = KVM_ENABLE_CAP;

// State save and restore (snapshots). Each has a line in Sources/KVM saying what it moves.
static const unsigned long AIRLOCK_KVM_SET_XCRS = KVM_SET_XCRS;
static const unsigned long AIRLOCK_KVM_GET_MP_STATE = KVM_GET_MP_STATE;
static const unsigned long AIRLOCK_KVM_SET_MP_STATE = KVM_SET_MP_STATE;
static const unsigned long AIRLOCK_KVM_GET_DEBUGREGS = KVM_GET_DEBUGREGS;
static const unsigned long AIRLOCK_KVM_SET_DEBUGREGS = KVM_SET_DEBUGREGS;
static const unsigned long AIRLOCK_KVM_GET_TSC_KHZ = KVM_GET_TSC_KHZ;
static const unsigned long AIRLOCK_KVM_GET_IRQCHIP = KVM_GET_IRQCHIP;
static const unsigned long AIRLOCK_KVM_SET_IRQCHIP = KVM_SET_IRQCHIP;
static const unsigned long AIRLOCK_KVM_GET_PIT2 = KVM_GET_PIT2;
static const unsigned long AIRLOCK_KVM_SET_PIT2 = KVM_SET_PIT2;
static const unsigned long AIRLOCK_KVM_GET_CLOCK = KVM_GET_CLOCK;
static const unsigned long AIRLOCK_KVM_SET_CLOCK = KVM_SET_CLOCK;

// Capabilities Airlock checks (enum values in linux/kvm.h are #defines).
static const int AIRLOCK_KVM_CAP_IRQCHIP = KVM_CAP_IRQCHIP;
static const int AIRLOCK_KVM_CAP_USER_MEMORY = KVM_CAP_USER_MEMORY;
static const int AIRLOCK_KVM_CAP_SET_TSS_ADDR = KVM_CAP_SET_TSS_ADDR;
static const int AIRLOCK_KVM_CAP_PIT2 = KVM_CAP_PIT2;
static const int AIRLOCK_KVM_CAP_IOEVENTFD = KVM_CAP_IOEVENTFD;
static const int AIRLOCK_KVM_CAP_IRQFD = KVM_CAP_IRQFD;
static const int AIRLOCK_KVM_CAP_EXT_CPUID = KVM_CAP_EXT_CPUID;
static const int AIRLOCK_KVM_CAP_IMMEDIATE_EXIT = KVM_CAP_IMMEDIATE_EXIT;
static const int AIRLOCK_KVM_CAP_VCPU_EVENTS = KVM_CAP_VCPU_EVENTS;
static const int AIRLOCK_KVM_CAP_NR_VCPUS = KVM_CAP_NR_VCPUS;
static const int AIRLOCK_KVM_CAP_MAX_VCPUS = KVM_CAP_MAX_VCPUS;
static const int AIRLOCK_KVM_CAP_XSAVE2 = KVM_CAP_XSAVE2;
static const int AIRLOCK_KVM_CAP_EXCEPTION_PAYLOAD = KVM_CAP_EXCEPTION_PAYLOAD;
static const unsigned int AIRLOCK_KVM_VCPUEVENT_VALID_PAYLOAD = KVM_VCPUEVENT_VALID_PAYLOAD;
static const int AIRLOCK_KVM_CAP_XSAVE = KVM_CAP_XSAVE;
static const int AIRLOCK_KVM_CAP_XCRS = KVM_CAP_XCRS;
static const int AIRLOCK_KVM_CAP_DEBUGREGS = KVM_CAP_DEBUGREGS;
static const int AIRLOCK_KVM_CAP_MP_STATE = KVM_CAP_MP_STATE;
static const int AIRLOCK_KVM_CAP_PIT_STATE2 = KVM_CAP_PIT_STATE2;
static const int AIRLOCK_KVM_CAP_ADJUST_CLOCK = KVM_CAP_ADJUST_CLOCK;
static const int AIRLOCK_KVM_CAP_GET_TSC_KHZ = KVM_CAP_GET_TSC_KHZ;

// Exit reasons.
static const uint32_t AIRLOCK_KVM_EXIT_UNKNOWN = KVM_EXIT_UNKNOWN;
static const uint32_t AIRLOCK_KVM_EXIT_IO = KVM_EXIT_IO;
static const uint32_t AIRLOCK_KVM_EXIT_HLT = KVM_EXIT_HLT;
static const uint32_t AIRLOCK_KVM_EXIT_MMIO = KVM_EXIT_MMIO;
static const uint32_t AIRLOCK_KVM_EXIT_SHUTDOWN = KVM_EXIT_SHUTDOWN;
static const uint32_t AIRLOCK_KVM_EXIT_FAIL_ENTRY = KVM_EXIT_FAIL_ENTRY;
static const uint32_t AIRLOCK_KVM_EXIT_INTR = KVM_EXIT_INTR;
static const uint32_t AIRLOCK_KVM_EXIT_INTERNAL_ERROR = KVM_EXIT_INTERNAL_ERROR;
static const uint32_t AIRLOCK_KVM_EXIT_SYSTEM_EVENT = KVM_EXIT_SYSTEM_EVENT;
static const uint32_t AIRLOCK_KVM_EXIT_IO_IN = KVM_EXIT_IO_IN;
static const uint32_t AIRLOCK_KVM_EXIT_IO_OUT = KVM_EXIT_IO_OUT;

// struct kvm_cpuid2 and struct kvm_msrs end in flexible arrays; these copies
// of their layouts with fixed capacities let Swift allocate them as values.
#define AIRLOCK_MAX_CPUID_ENTRIES 256
struct airlock_cpuid {
    __u32 nent;
    __u32 padding;
    struct kvm_cpuid_entry2 entries[AIRLOCK_MAX_CPUID_ENTRIES];
};
_Static_assert(__builtin_offsetof(struct airlock_cpuid, entries) == __builtin_offsetof(struct kvm_cpuid2, entries), "kvm_cpuid2 layout");
#define AIRLOCK_MAX_MSR_ENTRIES 32
struct airlock_msrs {
    __u32 nmsrs;
    __u32 pad;
    struct kvm_msr_entry entries[AIRLOCK_MAX_MSR_ENTRIES];
};
_Static_assert(__builtin_offsetof(struct airlock_msrs, entries) == __builtin_offsetof(struct kvm_msrs, entries), "kvm_msrs layout");

// Offsets into struct kvm_run of fields inside its anonymous union, which
// Swift's MemoryLayout.offset(of:) cannot reach.
static inline unsigned long airlock_kvm_run_mmio_data_offset(void) {
    return __builtin_offsetof(struct kvm_run, mmio.data);
}
static inline unsigned long airlock_kvm_run_immediate_exit_offset(void) {
    return __builtin_offsetof(struct kvm_run, immediate_exit);
}

// Descriptor passing over a Unix socket (SCM_RIGHTS), which needs the CMSG macros.
// Sends `count` bytes with `nfds` descriptors attached (MSG_NOSIGNAL: a closed peer is EPIPE,
// not a signal). Receives into `bytes`, storing up to AIRLOCK_MAX_PASSED_FDS descriptors
// (close-on-exec) in `fds`; `truncated` says descriptors were lost (and closed).
#define AIRLOCK_MAX_PASSED_FDS 24
ssize_t airlock_send_with_fds(int socket, const void *bytes, size_t count, const int *fds, int nfds);
ssize_t airlock_receive_with_fds(int socket, void *bytes, size_t count, int *fds, int *nfds, int *truncated);

// The kick signal's handler does nothing: its only job is to make a blocked
// KVM_RUN return EINTR. SA_RESTART is left off on purpose.
int airlock_install_kick_handler(int signo);

#endif
