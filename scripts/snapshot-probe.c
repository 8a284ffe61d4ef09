/* snapshot-probe: can a vCPU's whole state be saved from one VM and restored
 * into a fresh one on this host, and does a restored guest go on exactly as
 * the original would have?
 *
 *   gcc -O2 -Wall -o snapshot-probe scripts/snapshot-probe.c
 *   ./snapshot-probe emulated      # guest "kernel" code in KVM's emulator (PVM's default)
 *   ./snapshot-probe pv [FLAGS]    # the guest registers a VIF page first (PVM's PV mode; FLAGS default 0)
 *
 * (`make probe-snapshot` builds it and runs both.) It runs one payload guest
 * (VM A) to a checkpoint (an `out 0x10`), saves everything Airlock's
 * snapshots save (regs, sregs, XSAVE via KVM_GET_XSAVE2 where offered, XCRs,
 * every MSR in KVM_GET_MSR_INDEX_LIST plus the VIF MSR 0x4b564d10 in PV mode,
 * LAPIC, vCPU events, MP state, debug registers, PIC master/slave, IOAPIC,
 * PIT2, kvmclock) and guest RAM (written to a file), then builds VM B from
 * nothing: the RAM file mapped MAP_PRIVATE, a new irqchip, PIT and vCPU, the
 * state set back. Both VMs then run to the end; the guest writes what it sees
 * (GPRs, MSRs it reads back, YMM registers in PV mode, interrupts the PIC
 * delivered in emulated mode) into RAM, and the probe compares A with B.
 * In PV mode it also times a 1 M-iteration loop after the checkpoint in both
 * VMs: native speed in B means KVM_SET_MSRS on 0x4b564d10 brought the vCPU
 * back into PV mode; a third VM (C), restored without that MSR, is the control
 * and must run the loop emulated. Exit status 0 when B matched A. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MEMSZ (64ul << 20)
#define CODE 0x10000
#define RESULTS 0x40000
#define YMM_OUT 0x41000
#define IRQ_COUNT 0x40800
#define VIF_MSR 0x4b564d10u

/* The guest: entered at CPL0 in long mode with rdi = mode (0 emulated, 1 PV)
 * and r15 = VIF flags. Ports: 0x10 checkpoint, 0x11 done, 0x12 "send an IRQ",
 * 0x97/0x98 timed section, 0xEE unexpected exception. */
__asm__(
    ".pushsection .rodata.guest,\"a\"\n"
    ".intel_syntax noprefix\n"
    ".code64\n"
    ".globl guest_start, guest_irq, guest_exception, guest_end\n"
    "guest_start:\n"
    "  cmp edi, 1\n"
    "  jne 1f\n"
    "  mov ecx, 0x4b564d10\n"
    "  mov eax, 0x5000\n"
    "  or rax, r15\n"
    "  xor edx, edx\n"
    "  wrmsr\n"
    "1:\n"
    "  mov ecx, 0xC0000102\n"          /* KERNEL_GS_BASE */
    "  mov eax, 0x5678ABCD\n"
    "  mov edx, 0xFFFF8000\n"
    "  wrmsr\n"
    "  mov ecx, 0xC0000084\n"          /* SFMASK */
    "  mov eax, 0x47700\n"
    "  xor edx, edx\n"
    "  wrmsr\n"
    "  mov ecx, 0xC0000081\n"          /* STAR */
    "  xor eax, eax\n"
    "  mov edx, 0x00230010\n"
    "  wrmsr\n"
    /* PIC: master at vector 0x20, slave at 0x28, only IRQ2 (cascade) and IRQ3 unmasked */
    "  mov al, 0x11\n  out 0x20, al\n  out 0xA0, al\n"
    "  mov al, 0x20\n  out 0x21, al\n"
    "  mov al, 0x28\n  out 0xA1, al\n"
    "  mov al, 4\n  out 0x21, al\n"
    "  mov al, 2\n  out 0xA1, al\n"
    "  mov al, 1\n  out 0x21, al\n  out 0xA1, al\n"
    "  mov al, 0xF3\n  out 0x21, al\n"
    "  mov al, 0xFF\n  out 0xA1, al\n"
    "  movabs rax, 0x0101010101010101\n"
    "  movabs rbx, 0x0202020202020202\n"
    "  movabs rcx, 0x0303030303030303\n"
    "  movabs rdx, 0x0404040404040404\n"
    "  movabs rsi, 0x0505050505050505\n"
    "  movabs rbp, 0x0606060606060606\n"
    "  movabs r8, 0x0808080808080808\n"
    "  movabs r9, 0x0909090909090909\n"
    "  movabs r10, 0x0A0A0A0A0A0A0A0A\n"
    "  movabs r11, 0x0B0B0B0B0B0B0B0B\n"
    "  movabs r12, 0x0C0C0C0C0C0C0C0C\n"
    "  movabs r13, 0x0D0D0D0D0D0D0D0D\n"
    "  movabs r14, 0x0E0E0E0E0E0E0E0E\n"
    "  out 0x10, al\n"                 /* the checkpoint */
    "  mov qword ptr [0x40000], rax\n"
    "  mov qword ptr [0x40008], rbx\n"
    "  mov qword ptr [0x40010], rcx\n"
    "  mov qword ptr [0x40018], rdx\n"
    "  mov qword ptr [0x40020], rsi\n"
    "  mov qword ptr [0x40028], rdi\n"
    "  mov qword ptr [0x40030], rbp\n"
    "  mov qword ptr [0x40038], rsp\n"
    "  mov qword ptr [0x40040], r8\n"
    "  mov qword ptr [0x40048], r9\n"
    "  mov qword ptr [0x40050], r10\n"
    "  mov qword ptr [0x40058], r11\n"
    "  mov qword ptr [0x40060], r12\n"
    "  mov qword ptr [0x40068], r13\n"
    "  mov qword ptr [0x40070], r14\n"
    "  mov qword ptr [0x40078], r15\n"
    "  mov ecx, 0xC0000102\n  rdmsr\n  mov dword ptr [0x40080], eax\n  mov dword ptr [0x40084], edx\n"
    "  mov ecx, 0xC0000084\n  rdmsr\n  mov dword ptr [0x40088], eax\n  mov dword ptr [0x4008C], edx\n"
    "  mov ecx, 0xC0000081\n  rdmsr\n  mov dword ptr [0x40090], eax\n  mov dword ptr [0x40094], edx\n"
    "  cmp edi, 1\n"
    "  jne 2f\n"
    "  mov ecx, 0x4b564d10\n  rdmsr\n  mov dword ptr [0x40098], eax\n  mov dword ptr [0x4009C], edx\n"
    "  vmovdqu ymmword ptr [0x41000], ymm0\n"
    "  vmovdqu ymmword ptr [0x41020], ymm1\n"
    "  vmovdqu ymmword ptr [0x41040], ymm2\n"
    "  vmovdqu ymmword ptr [0x41060], ymm3\n"
    "  vmovdqu ymmword ptr [0x41080], ymm4\n"
    "  vmovdqu ymmword ptr [0x410A0], ymm5\n"
    "  vmovdqu ymmword ptr [0x410C0], ymm6\n"
    "  vmovdqu ymmword ptr [0x410E0], ymm7\n"
    "  out 0x97, al\n"
    "  mov rcx, 1000000\n"
    "3: dec rcx\n  jnz 3b\n"
    "  out 0x98, al\n"
    "  jmp 4f\n"
    "2:\n"
    "  sti\n"
    "5: out 0x12, al\n"                /* the VMM pulses IRQ 3 before the next entry */
    "  mov ecx, 100000\n"
    "6: cmp dword ptr [0x40800], 3\n"
    "  jae 7f\n"
    "  dec ecx\n"
    "  jnz 6b\n"
    "7: cmp dword ptr [0x40800], 3\n"
    "  jb 5b\n"
    "  cli\n"
    "4: out 0x11, al\n"
    "  hlt\n"
    "guest_irq:\n"
    "  push rax\n"
    "  inc dword ptr [0x40800]\n"
    "  mov al, 0x20\n  out 0x20, al\n"   /* EOI */
    "  pop rax\n"
    "  iretq\n"
    "guest_exception:\n"
    "  out 0xEE, al\n"
    "  hlt\n"
    "guest_end:\n"
    ".att_syntax prefix\n"
    ".popsection\n");
extern const char guest_start[], guest_irq[], guest_exception[], guest_end[];

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
static int failures;
static void check(int ok, const char *what) { printf("  %-58s %s\n", what, ok ? "ok" : "FAILED"); if (!ok) failures++; }
static int xioctl(int fd, unsigned long req, void *arg, const char *name) {
    int rc;
    do rc = ioctl(fd, req, arg); while (rc < 0 && errno == EINTR);
    if (rc < 0) printf("  %s: %s\n", name, strerror(errno));
    return rc;
}

static int kvm;
static int xsave_size;   /* KVM_CAP_XSAVE2's size, or 0: legacy 4 KiB KVM_GET_XSAVE */

struct vcpu_state {
    struct kvm_regs regs;
    struct kvm_sregs sregs;
    struct kvm_xsave *xsave;
    struct kvm_xcrs xcrs;
    struct kvm_lapic_state lapic;
    struct kvm_vcpu_events events;
    struct kvm_mp_state mp;
    struct kvm_debugregs debugregs;
    uint32_t nmsrs;
    struct kvm_msr_entry msrs[512];
};
struct vm_state {
    struct kvm_irqchip chips[3];   /* PIC master, PIC slave, IOAPIC */
    struct kvm_pit_state2 pit;
    struct kvm_clock_data clock;
};

static struct { struct kvm_msr_list list; uint32_t indices[512]; } msr_list = { .list.nmsrs = 512 };

/* KVM_GET_MSRS stops at the first MSR it cannot read and returns how many it
 * read: read in runs, skipping each one KVM refuses. */
static uint32_t read_msrs(int vcpu, const uint32_t *indices, uint32_t n, struct kvm_msr_entry *out) {
    uint32_t kept = 0;
    struct { struct kvm_msrs m; struct kvm_msr_entry e[512]; } buf;
    uint32_t i = 0;
    while (i < n) {
        buf.m.nmsrs = n - i;
        for (uint32_t j = 0; j < n - i; j++) { buf.e[j].index = indices[i + j]; buf.e[j].data = 0; buf.e[j].reserved = 0; }
        int rc = ioctl(vcpu, KVM_GET_MSRS, &buf);
        if (rc < 0) { perror("KVM_GET_MSRS"); return kept; }
        for (int j = 0; j < rc; j++) out[kept++] = buf.e[j];
        i += (uint32_t)rc + 1;   /* skip the refused one */
    }
    return kept;
}

static int save_vcpu(int vcpu, struct vcpu_state *s, int pv) {
    int bad = 0;
    bad |= xioctl(vcpu, KVM_GET_REGS, &s->regs, "KVM_GET_REGS") < 0;
    bad |= xioctl(vcpu, KVM_GET_SREGS, &s->sregs, "KVM_GET_SREGS") < 0;
    size_t size = xsave_size > 0 ? (size_t)xsave_size : sizeof(struct kvm_xsave);
    s->xsave = calloc(1, size);
    bad |= xioctl(vcpu, xsave_size > 0 ? KVM_GET_XSAVE2 : KVM_GET_XSAVE, s->xsave, "KVM_GET_XSAVE2") < 0;
    bad |= xioctl(vcpu, KVM_GET_XCRS, &s->xcrs, "KVM_GET_XCRS") < 0;
    bad |= xioctl(vcpu, KVM_GET_LAPIC, &s->lapic, "KVM_GET_LAPIC") < 0;
    bad |= xioctl(vcpu, KVM_GET_VCPU_EVENTS, &s->events, "KVM_GET_VCPU_EVENTS") < 0;
    bad |= xioctl(vcpu, KVM_GET_MP_STATE, &s->mp, "KVM_GET_MP_STATE") < 0;
    bad |= xioctl(vcpu, KVM_GET_DEBUGREGS, &s->debugregs, "KVM_GET_DEBUGREGS") < 0;
    uint32_t indices[513];
    memcpy(indices, msr_list.indices, msr_list.list.nmsrs * sizeof(uint32_t));
    uint32_t n = msr_list.list.nmsrs;
    if (pv) indices[n++] = VIF_MSR;
    s->nmsrs = read_msrs(vcpu, indices, n, s->msrs);
    printf("  saved %u of %u MSRs (KVM_GET_MSR_INDEX_LIST%s)\n", s->nmsrs, n, pv ? " + 0x4b564d10" : "");
    return bad;
}

static int restore_vcpu(int vcpu, struct vcpu_state *s) {
    int bad = 0;
    /* Order: sregs (EFER, CR4, APIC base) before the FPU/XSAVE state and the
     * LAPIC; MSRs after the LAPIC (the TSC deadline lives in it); events last. */
    bad |= xioctl(vcpu, KVM_SET_SREGS, &s->sregs, "KVM_SET_SREGS") < 0;
    bad |= xioctl(vcpu, KVM_SET_XSAVE, s->xsave, "KVM_SET_XSAVE") < 0;
    bad |= xioctl(vcpu, KVM_SET_XCRS, &s->xcrs, "KVM_SET_XCRS") < 0;
    bad |= xioctl(vcpu, KVM_SET_REGS, &s->regs, "KVM_SET_REGS") < 0;
    bad |= xioctl(vcpu, KVM_SET_LAPIC, &s->lapic, "KVM_SET_LAPIC") < 0;
    struct { struct kvm_msrs m; struct kvm_msr_entry e[512]; } buf;
    buf.m.nmsrs = s->nmsrs;
    memcpy(buf.e, s->msrs, s->nmsrs * sizeof(struct kvm_msr_entry));
    int rc = ioctl(vcpu, KVM_SET_MSRS, &buf);
    printf("  KVM_SET_MSRS set %d of %u\n", rc, s->nmsrs);
    if (rc != (int)s->nmsrs) {
        bad = 1;
        if (rc >= 0 && rc < (int)s->nmsrs) printf("  first refused: 0x%x = 0x%llx\n", buf.e[rc].index, (unsigned long long)buf.e[rc].data);
    }
    bad |= xioctl(vcpu, KVM_SET_DEBUGREGS, &s->debugregs, "KVM_SET_DEBUGREGS") < 0;
    bad |= xioctl(vcpu, KVM_SET_MP_STATE, &s->mp, "KVM_SET_MP_STATE") < 0;
    bad |= xioctl(vcpu, KVM_SET_VCPU_EVENTS, &s->events, "KVM_SET_VCPU_EVENTS") < 0;
    return bad;
}

static int save_vm(int vm, struct vm_state *s) {
    int bad = 0;
    for (int i = 0; i < 3; i++) {
        s->chips[i].chip_id = i;
        bad |= xioctl(vm, KVM_GET_IRQCHIP, &s->chips[i], "KVM_GET_IRQCHIP") < 0;
    }
    bad |= xioctl(vm, KVM_GET_PIT2, &s->pit, "KVM_GET_PIT2") < 0;
    bad |= xioctl(vm, KVM_GET_CLOCK, &s->clock, "KVM_GET_CLOCK") < 0;
    return bad;
}

static int restore_vm(int vm, struct vm_state *s) {
    int bad = 0;
    for (int i = 0; i < 3; i++) bad |= xioctl(vm, KVM_SET_IRQCHIP, &s->chips[i], "KVM_SET_IRQCHIP") < 0;
    bad |= xioctl(vm, KVM_SET_PIT2, &s->pit, "KVM_SET_PIT2") < 0;
    /* Only the clock value: KVM_CLOCK_REALTIME/HOST_TSC would ask KVM to add
     * the time that passed, which a restore decides itself. */
    struct kvm_clock_data c = { .clock = s->clock.clock };
    bad |= xioctl(vm, KVM_SET_CLOCK, &c, "KVM_SET_CLOCK") < 0;
    return bad;
}

struct machine { int vm, vcpu; struct kvm_run *run; uint8_t *mem; };
static struct { struct kvm_cpuid2 c; struct kvm_cpuid_entry2 e[256]; } cpuid = { .c.nent = 256 };

static struct machine create(uint8_t *mem) {
    struct machine m = { .mem = mem };
    m.vm = ioctl(kvm, KVM_CREATE_VM, 0);
    ioctl(m.vm, KVM_SET_TSS_ADDR, 0xfffbd000);
    uint64_t idmap = 0xfffbc000;
    ioctl(m.vm, KVM_SET_IDENTITY_MAP_ADDR, &idmap);
    struct kvm_userspace_memory_region r = { .slot = 0, .guest_phys_addr = 0, .memory_size = MEMSZ, .userspace_addr = (unsigned long)mem };
    if (ioctl(m.vm, KVM_SET_USER_MEMORY_REGION, &r) < 0) perror("KVM_SET_USER_MEMORY_REGION");
    if (ioctl(m.vm, KVM_CREATE_IRQCHIP, 0) < 0) perror("KVM_CREATE_IRQCHIP");
    struct kvm_pit_config pit = { .flags = KVM_PIT_SPEAKER_DUMMY };
    if (ioctl(m.vm, KVM_CREATE_PIT2, &pit) < 0) perror("KVM_CREATE_PIT2");
    m.vcpu = ioctl(m.vm, KVM_CREATE_VCPU, 0);
    m.run = mmap(NULL, ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0), PROT_READ | PROT_WRITE, MAP_SHARED, m.vcpu, 0);
    if (ioctl(m.vcpu, KVM_SET_CPUID2, &cpuid) < 0) perror("KVM_SET_CPUID2");
    return m;
}

/* Runs until port 0x10 (checkpoint) or 0x11 (done); returns the port, or -1. */
static double timed_loop;
static int run_until(struct machine *m, int stop_at_checkpoint) {
    double t0 = 0;
    for (;;) {
        int rc = ioctl(m->vcpu, KVM_RUN, 0);
        if (rc < 0) { if (errno == EINTR) continue; perror("KVM_RUN"); return -1; }
        if (m->run->exit_reason == KVM_EXIT_IO) {
            int port = m->run->io.port;
            if (port == 0x10 && stop_at_checkpoint) return 0x10;
            if (port == 0x10) continue;
            if (port == 0x11) return 0x11;
            if (port == 0x97) { t0 = now(); continue; }
            if (port == 0x98) { timed_loop = now() - t0; continue; }
            if (port == 0x12) {
                struct kvm_irq_level l = { .irq = 3, .level = 1 };
                ioctl(m->vm, KVM_IRQ_LINE, &l);
                l.level = 0;
                ioctl(m->vm, KVM_IRQ_LINE, &l);
                continue;
            }
            if (port == 0xEE) {
                struct kvm_regs r; ioctl(m->vcpu, KVM_GET_REGS, &r);
                printf("  unexpected exception in the guest, rsp=%llx: frame rip=%llx\n", r.rsp, (unsigned long long)*(uint64_t *)(m->mem + r.rsp + 8));
                return -1;
            }
            if (port >= 0x20 && port <= 0xA1) continue;   /* the PIC's own ports never exit; others are ignored */
            printf("  out to port 0x%x\n", port);
            continue;
        }
        struct kvm_regs r; ioctl(m->vcpu, KVM_GET_REGS, &r);
        printf("  exit reason %d at rip=%llx", m->run->exit_reason, r.rip);
        if (m->run->exit_reason == KVM_EXIT_INTERNAL_ERROR) {
            printf(" suberror %d:", m->run->internal.suberror);
            for (unsigned j = 0; j < m->run->internal.ndata && j < 4; j++) printf(" %llx", m->run->internal.data[j]);
        }
        printf("\n");
        return -1;
    }
}

static void setup_guest(uint8_t *mem) {
    uint64_t *gdt = (uint64_t *)(mem + 0x500);
    gdt[0] = 0; gdt[1] = 0x00af9b000000ffffull; gdt[2] = 0x00cf93000000ffffull; gdt[3] = 0x008f8b000000ffffull;
    uint64_t *pml4 = (uint64_t *)(mem + 0x20000), *pdpt = (uint64_t *)(mem + 0xa000), *pd = (uint64_t *)(mem + 0xb000);
    /* _PAGE_USER on every entry: in PV mode guest "kernel" code runs at hardware ring 3. */
    pml4[0] = 0xa000 | 7; pdpt[0] = 0xb000 | 7;
    for (int i = 0; i < 32; i++) pd[i] = ((uint64_t)i << 21) | 0x87;
    memcpy(mem + CODE, guest_start, guest_end - guest_start);
    uint64_t *idt = (uint64_t *)(mem + 0x800);
    for (int v = 0; v < 256; v++) {
        uint64_t h = CODE + (uint64_t)(v == 0x23 ? guest_irq - guest_start : guest_exception - guest_start);
        if (v >= 0x20 && v != 0x23) continue;
        idt[v * 2] = (h & 0xffff) | ((uint64_t)8 << 16) | ((uint64_t)0x8e00 << 32) | (((h >> 16) & 0xffff) << 48);
        idt[v * 2 + 1] = h >> 32;
    }
}

static void setup_vcpu(struct machine *m, int pv, uint64_t flags) {
    struct kvm_sregs s;
    ioctl(m->vcpu, KVM_GET_SREGS, &s);
    struct kvm_segment cs = { .base = 0, .limit = 0xfffff, .selector = 8, .type = 11, .present = 1, .s = 1, .l = 1, .g = 1 };
    struct kvm_segment ds = { .base = 0, .limit = 0xfffff, .selector = 0x10, .type = 3, .present = 1, .db = 1, .s = 1, .g = 1 };
    struct kvm_segment tr = { .base = 0, .limit = 0xfffff, .selector = 0x18, .type = 11, .present = 1, .g = 1 };
    s.cs = cs; s.ds = s.es = s.fs = s.gs = s.ss = ds; s.tr = tr;
    s.gdt.base = 0x500; s.gdt.limit = 31; s.idt.base = 0x800; s.idt.limit = 4095;
    s.cr0 = 0x80000033; s.cr3 = 0x20000; s.cr4 = 0x20 | 0x40000 /* OSXSAVE */ | 0x600 /* OSFXSR, OSXMMEXCPT */; s.efer = 0x500;
    if (xioctl(m->vcpu, KVM_SET_SREGS, &s, "KVM_SET_SREGS (boot)") < 0) exit(2);
    /* XCR0 = x87 | SSE | AVX, so YMM state exists to be saved. */
    struct kvm_xcrs x = { .nr_xcrs = 1, .xcrs[0] = { .xcr = 0, .value = 7 } };
    xioctl(m->vcpu, KVM_SET_XCRS, &x, "KVM_SET_XCRS (boot)");
    /* A recognisable pattern in YMM0-7 (legacy area: XMM at 160; AVX upper halves at 576). */
    size_t size = xsave_size > 0 ? (size_t)xsave_size : sizeof(struct kvm_xsave);
    struct kvm_xsave *xs = calloc(1, size);
    ioctl(m->vcpu, xsave_size > 0 ? KVM_GET_XSAVE2 : KVM_GET_XSAVE, xs);
    uint8_t *b = (uint8_t *)xs->region;
    for (int i = 0; i < 8; i++) for (int j = 0; j < 16; j++) { b[160 + 16 * i + j] = (uint8_t)(0x40 + 16 * i + j); b[576 + 16 * i + j] = (uint8_t)(0xC0 + i + j); }
    *(uint64_t *)(b + 512) |= 7;   /* XSTATE_BV: x87, SSE, AVX present */
    *(uint32_t *)(b + 24) = 0x1f80; /* MXCSR */
    if (xioctl(m->vcpu, KVM_SET_XSAVE, xs, "KVM_SET_XSAVE (boot)") < 0) printf("  (YMM pattern not set)\n");
    free(xs);
    /* LINT0 as ExtINT, LINT1 as NMI: the PIC's interrupts reach the CPU. */
    struct kvm_lapic_state l;
    ioctl(m->vcpu, KVM_GET_LAPIC, &l);
    uint32_t *lint0 = (uint32_t *)(l.regs + 0x350), *lint1 = (uint32_t *)(l.regs + 0x360);
    *lint0 = (*lint0 & ~0x10700u) | (7 << 8);
    *lint1 = (*lint1 & ~0x10700u) | (4 << 8);
    ioctl(m->vcpu, KVM_SET_LAPIC, &l);
    struct kvm_regs g = { .rip = CODE, .rsp = 0x8000, .rflags = 2, .rdi = (uint64_t)pv, .r15 = flags };
    ioctl(m->vcpu, KVM_SET_REGS, &g);
}

int main(int argc, char **argv) {
    int pv = argc > 1 && strcmp(argv[1], "pv") == 0;
    if (argc < 2 || (!pv && strcmp(argv[1], "emulated") != 0)) {
        fprintf(stderr, "usage: %s emulated | pv [VIF-FLAGS]\n", argv[0]);
        return 2;
    }
    uint64_t flags = argc > 2 ? strtoull(argv[2], 0, 0) : 0;
    alarm(300);
    kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) { perror("/dev/kvm"); return 2; }
    xsave_size = ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_XSAVE2);
    printf("mode %s%s; capabilities: XSAVE2 %d, XCRS %d, DEBUGREGS %d, ADJUST_CLOCK %d, MP_STATE %d, PIT_STATE2 %d, VCPU_EVENTS %d\n",
           pv ? "pv, VIF flags " : "emulated", pv ? argv[2] ? argv[2] : "0" : "", xsave_size,
           ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_XCRS), ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_DEBUGREGS),
           ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_ADJUST_CLOCK), ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_MP_STATE),
           ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_PIT_STATE2), ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_VCPU_EVENTS));
    if (ioctl(kvm, KVM_GET_MSR_INDEX_LIST, &msr_list) < 0) { perror("KVM_GET_MSR_INDEX_LIST"); return 2; }
    if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, &cpuid) < 0) { perror("KVM_GET_SUPPORTED_CPUID"); return 2; }

    uint8_t *mem_a = mmap(NULL, MEMSZ, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    setup_guest(mem_a);
    struct machine a = create(mem_a);
    setup_vcpu(&a, pv, flags);
    printf("VM A: running to the checkpoint\n");
    if (run_until(&a, 1) != 0x10) { printf("VM A did not reach the checkpoint\n"); return 1; }

    static struct vcpu_state vs;
    static struct vm_state ms;
    int bad = save_vcpu(a.vcpu, &vs, pv) | save_vm(a.vm, &ms);
    check(!bad, "every state ioctl of the save succeeded");
    if (pv) {
        for (uint32_t i = 0; i < vs.nmsrs; i++)
            if (vs.msrs[i].index == VIF_MSR) printf("  saved VIF MSR 0x4b564d10 = 0x%llx\n", (unsigned long long)vs.msrs[i].data);
        printf("  saved cs=0x%x dpl=%d ss=0x%x cr3=0x%llx rflags=0x%llx\n", vs.sregs.cs.selector, vs.sregs.cs.dpl, vs.sregs.ss.selector,
               (unsigned long long)vs.sregs.cr3, (unsigned long long)vs.regs.rflags);
    }
    char path[] = "/tmp/snapshot-probe-ram-XXXXXX";
    int rfd = mkstemp(path);
    unlink(path);
    if (rfd < 0 || write(rfd, mem_a, MEMSZ) != (ssize_t)MEMSZ) { perror("writing guest RAM"); return 2; }

    printf("VM B: restoring into a fresh VM\n");
    double t0 = now();
    uint8_t *mem_b = mmap(NULL, MEMSZ, PROT_READ | PROT_WRITE, MAP_PRIVATE, rfd, 0);
    struct machine b = create(mem_b);
    bad = restore_vcpu(b.vcpu, &vs) | restore_vm(b.vm, &ms);
    double restore_ms = (now() - t0) * 1e3;
    check(!bad, "every state ioctl of the restore succeeded");
    printf("  restore (VM, memory, irqchip, PIT, vCPU, state) took %.2f ms\n", restore_ms);

    static struct vcpu_state back;
    save_vcpu(b.vcpu, &back, pv);
    check(memcmp(&back.regs, &vs.regs, sizeof vs.regs) == 0, "KVM_GET_REGS after restore equals the saved regs");
    check(back.sregs.cr0 == vs.sregs.cr0 && back.sregs.cr3 == vs.sregs.cr3 && back.sregs.cr4 == vs.sregs.cr4 &&
          back.sregs.efer == vs.sregs.efer && back.sregs.cs.selector == vs.sregs.cs.selector, "control registers and CS read back");
    check(memcmp(back.lapic.regs, vs.lapic.regs, 0x300) == 0, "LAPIC registers below the timer read back");
    check(memcmp(back.xsave->region, vs.xsave->region, 1024) == 0, "XSAVE legacy area and AVX state read back");
    int msr_same = back.nmsrs == vs.nmsrs, tsc_drift = 0;
    for (uint32_t i = 0; msr_same && i < vs.nmsrs; i++) {
        if (back.msrs[i].index == 0x10) continue;   /* the TSC moves on */
        if (back.msrs[i].data != vs.msrs[i].data) {
            printf("  MSR 0x%x: saved 0x%llx, reads 0x%llx\n", vs.msrs[i].index, (unsigned long long)vs.msrs[i].data, (unsigned long long)back.msrs[i].data);
            if (vs.msrs[i].index != 0x6e0) msr_same = 0; else tsc_drift = 1;
        }
    }
    (void)tsc_drift;
    check(msr_same, "every saved MSR reads back (TSC aside)");

    printf("VM A: on to the end\n");
    timed_loop = 0;
    if (run_until(&a, 0) != 0x11) { printf("VM A did not finish\n"); return 1; }
    double loop_a = timed_loop;
    printf("VM B: on to the end\n");
    timed_loop = 0;
    if (run_until(&b, 0) != 0x11) { printf("VM B did not finish\n"); check(0, "VM B ran to the end"); return 1; }
    double loop_b = timed_loop;

    check(memcmp(mem_a + RESULTS, mem_b + RESULTS, 0xA0) == 0, "GPRs and MSRs the guest read after the checkpoint: A == B");
    check(*(uint64_t *)(mem_b + RESULTS + 0x08) == 0x0202020202020202ull && *(uint64_t *)(mem_b + RESULTS + 0x70) == 0x0E0E0E0E0E0E0E0Eull,
          "B's guest saw the GPRs it had set before the checkpoint");
    check(*(uint64_t *)(mem_b + RESULTS + 0x80) == 0xFFFF80005678ABCDull, "B's guest reads back KERNEL_GS_BASE it wrote in A");
    if (pv) {
        printf("  VIF MSR as the guest reads it: A 0x%llx, B 0x%llx\n", (unsigned long long)*(uint64_t *)(mem_a + RESULTS + 0x98),
               (unsigned long long)*(uint64_t *)(mem_b + RESULTS + 0x98));
        check(memcmp(mem_a + YMM_OUT, mem_b + YMM_OUT, 256) == 0, "YMM0-7 as the guest stores them: A == B");
        check(mem_b[YMM_OUT + 16] == 0xC0 && mem_b[YMM_OUT] == 0x40, "B's YMM0 holds the pattern set before the run");
        printf("  1 M-iteration loop after the checkpoint: A %.6f s, B %.6f s\n", loop_a, loop_b);
        check(loop_b < 0.05, "B ran the loop natively (PV mode came back with KVM_SET_MSRS)");
        /* The control: the same restore without the VIF MSR must run the loop emulated. */
        printf("VM C: the same restore without MSR 0x4b564d10 (the control)\n");
        uint8_t *mem_c = mmap(NULL, MEMSZ, PROT_READ | PROT_WRITE, MAP_PRIVATE, rfd, 0);
        struct machine c = create(mem_c);
        uint32_t kept = 0;
        for (uint32_t i = 0; i < vs.nmsrs; i++) if (vs.msrs[i].index != VIF_MSR) vs.msrs[kept++] = vs.msrs[i];
        vs.nmsrs = kept;
        restore_vcpu(c.vcpu, &vs);
        restore_vm(c.vm, &ms);
        timed_loop = 0;
        int end = run_until(&c, 0);
        printf("  VM C %s; its loop took %.6f s\n", end == 0x11 ? "finished" : "did not finish", timed_loop);
        /* Emulated, the AVX store after the checkpoint is an emulation failure (or the loop is slow). */
        check(end != 0x11 || timed_loop > 0.05, "without the VIF MSR the restored vCPU is emulated (control)");
    } else {
        printf("  interrupts delivered after the checkpoint: A %u, B %u\n", *(uint32_t *)(mem_a + IRQ_COUNT), *(uint32_t *)(mem_b + IRQ_COUNT));
        check(*(uint32_t *)(mem_b + IRQ_COUNT) == 3, "B's restored PIC and LAPIC delivered IRQ 3 three times");
    }
    printf("%s\n", failures ? "RESULT: the restored VM differs" : "RESULT: the restored VM went on exactly as the original");
    return failures ? 1 : 0;
}
