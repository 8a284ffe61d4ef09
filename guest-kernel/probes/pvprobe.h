/* pvprobe.h: constants shared by the probe VMM (pvprobe.c) and its guest (pvprobe-guest.S).
   Only #defines: the guest includes it through the C preprocessor. */
#ifndef PVPROBE_H
#define PVPROBE_H

/* Guest-physical layout. Everything is identity-mapped: the first 2 MiB with 4 KiB
   pages (so single pages can get their own permissions), 2..64 MiB with 2 MiB pages. */
#define G_GDT      0x1000   /* Linux's selector layout: 0x10 KCS, 0x18 KDS, 0x23 U32CS, 0x2b UDS, 0x33 UCS, 0x40 TSS */
#define G_TSS      0x2000
#define G_IDT      0x3000
#define G_VIF      0x5000   /* the VIF page the guest (or the VMM) registers */
#define G_CODE     0x10000  /* guest code (up to 0x7ffff), linked here, entered here (a jump to start) */
#define G_STUBS    0x11000  /* IDT stub for vector v at G_STUBS + 16 v */
#define G_PSTUBS   0x12000  /* "switch CR3 first" stubs (experiment perm) at G_PSTUBS + 16 v */
#define G_UCODE    0x13000  /* user code, 16 KiB (events with a frame RIP here came from user mode) */
#define G_UCODE_SZ 0x4000
#define G_KPML4    0x80000
#define G_UPML4    0x81000
#define G_KPDPT    0x82000
#define G_UPDPT    0x83000
#define G_KPD      0x84000
#define G_UPD      0x85000
#define G_KPT      0x86000
#define G_UPT      0x87000
#define G_VARS     0x90000  /* guest variables (see V_* below) */
#define G_RECS     0x91000  /* result records: {u64 id, u64 value}, up to 4096 */
#define G_RECS_END 0xa1000
#define G_RSP0     0xa2000  /* TSS.RSP0 stack page; top = G_RSP0 + 0x1000 */
#define G_IST1     0xa3000  /* IST1 stack page */
#define G_KSTACK   0xa4000  /* initial kernel stack, 16 KiB, top 0xa8000 */
#define G_USTACK   0xb0000  /* user stack, 16 KiB, top 0xb4000 */
#define G_SONLY    0xc0000  /* supervisor-only page (U=0) in both tables */
#define G_NOTPRES  0xc1000  /* not present in both tables */
#define G_KONLY    0xc2000  /* present in the kernel table only ("KERNONLY" marker) */
#define MEMSZ      (64ul << 20)

/* Variables at G_VARS. */
#define V_RECPTR   (G_VARS + 0x00)  /* next free record */
#define V_RESUME   (G_VARS + 0x08)  /* a fault handler continues here (then clears it) */
#define V_FAULTVEC (G_VARS + 0x10)  /* last vector a handler saw */
#define V_URET     (G_VARS + 0x18)  /* how handlers return to user mode: RET_* */
#define V_TMP      (G_VARS + 0x20)
#define V_TMP2     (G_VARS + 0x28)
#define V_VARIANT  (G_VARS + 0x30)
#define V_LOOPS    (G_VARS + 0x38)
#define V_SAVE     (G_VARS + 0x40)  /* 16 u64: user registers saved by user code */
#define V_FRAME    (G_VARS + 0xc0)  /* 8 u64: a hypercall 0x100d frame */
#define V_UCR3     (G_VARS + 0x100) /* CR3 to return to user mode with (0: keep) */
#define V_STATE    (G_VARS + 0x108) /* scratch for experiments */
#define V_IRQSEEN  (G_VARS + 0x110) /* vector 0x30 handler: frame RIP */
#define V_IRQCS    (G_VARS + 0x118) /* vector 0x30 handler: frame CS */
#define V_IRQIF    (G_VARS + 0x120) /* vector 0x30 handler: VIF.if at entry */
#define V_IRQN     (G_VARS + 0x128) /* vector 0x30 handler: count */
#define V_TSCKHZ   (G_VARS + 0x130)
#define V_QUIETEV  (G_VARS + 0x138) /* handlers record nothing (timed loops) */
#define V_IRQCHIP  (G_VARS + 0x148) /* 1: in-kernel irqchip, EOI with wrmsr 0x80b */
#define V_ONLY     (G_VARS + 0x150) /* experiment priv: run only the entry V_VARIANT */
#define V_NEXT     (G_VARS + 0x140) /* kernel-side sequence: next step */
#define G_XSAVE    0xd0000          /* 64-byte aligned XSAVE area (8 KiB) */

/* How a handler returns to user mode. */
#define RET_SYSRET  0   /* sysretq: rcx = rip, r11 = rflags, rsp = frame rsp (clobbers rcx, r11) */
#define RET_HC100D  1   /* hypercall 0x100d with rbx -> [rax, rbx?, rcx?, rip, cs, rflags, rsp, ss] */
#define RET_IRETQ   2   /* plain iretq */

/* Experiments (R15 at entry). */
#define EXP_INFO    0   /* detection, registration, speed */
#define EXP_PRIV    1   /* privileged instructions in PV kernel mode: fault or not, cost */
#define EXP_USER    2   /* events from user mode and what user mode is allowed to do */
#define EXP_KERN    3   /* events in PV kernel mode: frame, VIF.if, iretq */
#define EXP_RET     4   /* return-to-user semantics: 0x100d slots, VIF.if, pending interrupts */
#define EXP_PERM    5   /* which page permissions the host honours when it delivers an event */
#define EXP_COST    6   /* round-trip costs */
#define EXP_HOSTILE 7   /* garbage VIF page, unknown hypercalls, wild arguments */

/* Ports. */
#define P_REPORT 0xE0   /* VMM prints the records so far */
#define P_DUMP   0xE1   /* VMM dumps registers and sregs (tag in al) */
#define P_INJECT 0xE6   /* VMM queues KVM_INTERRUPT(al) before the next entry */
#define P_INJMS  0xE5   /* VMM injects vector al after rbx ms */
#define P_END    0xEF   /* end of the run */
#define P_KCHECK 0xE7   /* only reachable in (host) kernel mode: the VMM notes it */

#define IRQ_VEC 0x30

#endif
