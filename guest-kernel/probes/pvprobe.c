/* pvprobe: a probe VMM for the PVM host's paravirtual (PV) interface, learnt from inside a
   guest and through the KVM API only. Guest side: pvprobe-guest.S; layout: pvprobe.h; what each
   experiment settles: README.md. Build: `make` in this folder. Run as root:

     ./pvprobe EXP [key=value ...]

   EXP: info priv user kern ret perm cost hostile (or 0-7). Keys:
     vif=FLAGS     VIF flag bits the guest registers with (default 0); vif=none stays emulated
     vmmreg=1      the VMM registers the VIF page with KVM_SET_MSRS before the first KVM_RUN
     variant=N     experiment variant (see the guest routine)
     uret=sysret|100d|iretq   how handlers return to user mode (default 100d)
     perm=PAGE:P[,PAGE:P]     user-table permission for PAGE in tss idt gdt rsp0 ist1 (P: s = supervisor,
                              ro = read-only, np = not present, n = normal)   (experiment perm)
     gate=trap     trap gates (type 0xF) instead of interrupt gates
     gate1b=np|dpl0|dpl3      IDT gate 0x1b (default dpl0)
     only=1        experiment priv: run only entry number `variant` (the fatal ones each in a VM of their own)
     loops=N       iterations for timed loops (default 100000)
     irqchip=1     in-kernel irqchip (as Airlock has): x2APIC enabled by the VMM, interrupts sent with
                   KVM_SIGNAL_MSI (from another thread for timed ones), the guest EOIs with wrmsr 0x80b
     quiet=1       fewer VMM lines
   The run ends at the guest's `out 0xEF`, at any exit the probe does not expect, or after 10 s. */
#define _GNU_SOURCE
#include "pvprobe.h"
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>
#include <pthread.h>

static uint8_t *mem;
static int vcpu, vm, kvm;
static struct kvm_run *run;
static int quiet;
static unsigned recs_printed;
static uint64_t tsc_khz;

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
static uint64_t rd64(uint64_t gpa) { return gpa <= MEMSZ - 8 ? *(uint64_t *)(mem + gpa) : 0xbadbadbadull; }
static void wr64(uint64_t gpa, uint64_t v) { if (gpa <= MEMSZ - 8) *(uint64_t *)(mem + gpa) = v; }
static const char *gstr(uint64_t gpa) {
	static char b[96];
	size_t i;
	for (i = 0; i < sizeof b - 1 && gpa + i < MEMSZ && mem[gpa + i]; i++) b[i] = mem[gpa + i] >= 32 && mem[gpa + i] < 127 ? mem[gpa + i] : '?';
	b[i] = 0;
	return b;
}

static void dump(const char *what, int tag) {
	struct kvm_regs r; struct kvm_sregs s;
	ioctl(vcpu, KVM_GET_REGS, &r); ioctl(vcpu, KVM_GET_SREGS, &s);
	printf("[%s %02x] rip=%llx rsp=%llx rax=%llx rbx=%llx rcx=%llx rdx=%llx r11=%llx rflags=%llx\n"
	       "    cs=%x/dpl%d ss=%x/dpl%d cr0=%llx cr3=%llx cr4=%llx cr2=%llx efer=%llx tr=%x/%llx  VIF if=%d pend=%d +8=%llx\n",
	       what, tag, r.rip, r.rsp, r.rax, r.rbx, r.rcx, r.rdx, r.r11, r.rflags, s.cs.selector, s.cs.dpl,
	       s.ss.selector, s.ss.dpl, s.cr0, s.cr3, s.cr4, s.cr2, s.efer, s.tr.selector, s.tr.base,
	       mem[G_VIF], mem[G_VIF + 1], (unsigned long long)rd64(G_VIF + 8));
}

/* Records are {pointer to a NUL-terminated name in guest memory, value}. */
static void print_records(void) {
	uint64_t end = rd64(V_RECPTR);
	if (end < G_RECS || end > G_RECS_END) { printf("  (record pointer %llx out of range)\n", (unsigned long long)end); return; }
	unsigned n = (end - G_RECS) / 16;
	for (unsigned i = recs_printed; i < n; i++) {
		uint64_t name = rd64(G_RECS + 16 * i), v = rd64(G_RECS + 16 * i + 8);
		const char *s = gstr(name);
		if (strstr(s, "cyc") && tsc_khz)
			printf("  %-28s %llu cycles = %.3f us\n", s, (unsigned long long)v, v * 1000.0 / tsc_khz);
		else
			printf("  %-28s %#llx\n", s, (unsigned long long)v);
	}
	recs_printed = n;
}

static int irqchip;
static int send_msi(int vector) {
	struct kvm_msi msi = {.address_lo = 0xfee00000, .data = (uint32_t)vector};
	return ioctl(vm, KVM_SIGNAL_MSI, &msi);
}
struct timed_msi { int vector; unsigned ms; };
static void *timed_msi_thread(void *arg) {
	struct timed_msi t = *(struct timed_msi *)arg;
	free(arg);
	usleep(t.ms * 1000);
	int rc = send_msi(t.vector);
	if (!quiet) printf("  (VMM thread: KVM_SIGNAL_MSI %#x after %u ms: rc=%d; VIF if=%d pend=%d)\n", t.vector, t.ms, rc, mem[G_VIF], mem[G_VIF + 1]);
	return NULL;
}
static volatile sig_atomic_t alarm_fired;
static void onalarm(int sig) { (void)sig; alarm_fired = 1; }

static uint64_t pte_flags(const char *perm) {
	if (!strcmp(perm, "s")) return 0x3;        /* present, writable, supervisor */
	if (!strcmp(perm, "ro")) return 0x5;       /* present, read-only, user */
	if (!strcmp(perm, "np")) return 0x0;
	return 0x7;
}

int main(int argc, char **argv) {
	static const char *names[] = {"info", "priv", "user", "kern", "ret", "perm", "cost", "hostile"};
	if (argc < 2) { fprintf(stderr, "usage: %s EXP [key=value...] (see the header of pvprobe.c)\n", argv[0]); return 2; }
	int exp = -1;
	for (int i = 0; i < 8; i++) if (!strcmp(argv[1], names[i])) exp = i;
	if (exp < 0) exp = atoi(argv[1]);
	uint64_t vif = 0, variant = 0, uret = RET_HC100D, loops = 100000;
	int stay_emulated = 0, vmmreg = 0, trapgates = 0, only = 0;
	const char *perm = "", *gate1b = "dpl0";
	for (int i = 2; i < argc; i++) {
		char *k = argv[i], *v = strchr(k, '=');
		if (!v) { fprintf(stderr, "argument %s: expected key=value\n", k); return 2; }
		*v++ = 0;
		if (!strcmp(k, "vif")) { if (!strcmp(v, "none")) stay_emulated = 1; else vif = strtoull(v, 0, 0); }
		else if (!strcmp(k, "vmmreg")) vmmreg = atoi(v);
		else if (!strcmp(k, "variant")) variant = strtoull(v, 0, 0);
		else if (!strcmp(k, "uret")) uret = !strcmp(v, "sysret") ? RET_SYSRET : !strcmp(v, "iretq") ? RET_IRETQ : RET_HC100D;
		else if (!strcmp(k, "perm")) perm = v;
		else if (!strcmp(k, "gate")) trapgates = !strcmp(v, "trap");
		else if (!strcmp(k, "gate1b")) gate1b = v;
		else if (!strcmp(k, "loops")) loops = strtoull(v, 0, 0);
		else if (!strcmp(k, "only")) only = atoi(v);
		else if (!strcmp(k, "quiet")) quiet = atoi(v);
		else if (!strcmp(k, "irqchip")) irqchip = atoi(v);
		else { fprintf(stderr, "unknown key %s\n", k); return 2; }
	}
	struct sigaction sa = {0}; sa.sa_handler = onalarm; sigaction(SIGALRM, &sa, 0);

	double t0 = now();
	kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0) { perror("/dev/kvm"); return 1; }
	vm = ioctl(kvm, KVM_CREATE_VM, 0);
	ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000);
	if (irqchip && ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0) { perror("KVM_CREATE_IRQCHIP"); return 1; }
	mem = mmap(NULL, MEMSZ, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	struct kvm_userspace_memory_region mr = {.slot = 0, .guest_phys_addr = 0, .memory_size = MEMSZ, .userspace_addr = (unsigned long)mem};
	if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &mr) < 0) { perror("memory region"); return 1; }

	/* GDT in Linux's layout. */
	uint64_t *gdt = (uint64_t *)(mem + G_GDT);
	gdt[2] = 0x00af9b000000ffffull;  /* 0x10 kernel code, 64-bit */
	gdt[3] = 0x00cf93000000ffffull;  /* 0x18 kernel data */
	gdt[4] = 0x00cffb000000ffffull;  /* 0x23 user code, 32-bit */
	gdt[5] = 0x00cff3000000ffffull;  /* 0x2b user data */
	gdt[6] = 0x00affb000000ffffull;  /* 0x33 user code, 64-bit */
	gdt[8] = 0x0000890000000067ull | ((uint64_t)G_TSS << 16); /* 0x40 TSS, available */
	uint8_t *tss = mem + G_TSS;
	*(uint64_t *)(tss + 4) = G_RSP0 + 0x1000;   /* RSP0 */
	*(uint64_t *)(tss + 0x24) = G_IST1 + 0x1000; /* IST1 */
	*(uint16_t *)(tss + 0x66) = 0x68;

	/* Page tables: two trees (kernel, user), 4 KiB pages for the first 2 MiB. */
	uint64_t *kpml4 = (uint64_t *)(mem + G_KPML4), *upml4 = (uint64_t *)(mem + G_UPML4);
	uint64_t *kpdpt = (uint64_t *)(mem + G_KPDPT), *updpt = (uint64_t *)(mem + G_UPDPT);
	uint64_t *kpd = (uint64_t *)(mem + G_KPD), *upd = (uint64_t *)(mem + G_UPD);
	uint64_t *kpt = (uint64_t *)(mem + G_KPT), *upt = (uint64_t *)(mem + G_UPT);
	kpml4[0] = G_KPDPT | 7; upml4[0] = G_UPDPT | 7; kpdpt[0] = G_KPD | 7; updpt[0] = G_UPD | 7;
	kpd[0] = G_KPT | 7; upd[0] = G_UPT | 7;
	for (int i = 1; i < 32; i++) kpd[i] = upd[i] = ((uint64_t)i << 21) | 0x87;
	for (int i = 0; i < 512; i++) kpt[i] = upt[i] = ((uint64_t)i << 12) | 7;
	kpt[G_SONLY >> 12] = upt[G_SONLY >> 12] = G_SONLY | 3;
	kpt[G_NOTPRES >> 12] = upt[G_NOTPRES >> 12] = 0;
	upt[G_KONLY >> 12] = 0;
	memcpy(mem + G_SONLY, "SUPONLY!", 8);
	memcpy(mem + G_KONLY, "KERNONLY", 8);
	if (*perm) {
		char *p = strdup(perm), *t;
		for (t = strtok(p, ","); t; t = strtok(0, ",")) {
			char *c = strchr(t, ':'); if (!c) continue; *c++ = 0;
			uint64_t page = !strcmp(t, "tss") ? G_TSS : !strcmp(t, "idt") ? G_IDT : !strcmp(t, "gdt") ? G_GDT
			              : !strcmp(t, "rsp0") ? G_RSP0 : !strcmp(t, "ist1") ? G_IST1 : 0;
			if (!page) { fprintf(stderr, "perm: unknown page %s\n", t); return 2; }
			upt[page >> 12] = page | pte_flags(c);
			printf("user table: page %#llx (%s) flags %#llx\n", (unsigned long long)page, t, (unsigned long long)pte_flags(c));
		}
	}

	FILE *f = fopen("pvprobe-guest.bin", "rb");
	if (!f) { perror("pvprobe-guest.bin (run make first)"); return 1; }
	size_t n = fread(mem + G_CODE, 1, G_KPML4 - G_CODE, f); fclose(f); /* code up to the page tables */
	if (n >= G_KPML4 - G_CODE) { fprintf(stderr, "guest binary too large\n"); return 1; }

	/* IDT: every vector to its stub (experiment perm: the "switch CR3 first" stubs). */
	uint64_t *idt = (uint64_t *)(mem + G_IDT);
	for (int v = 0; v < 256; v++) {
		uint64_t h = (exp == EXP_PERM ? G_PSTUBS : G_STUBS) + v * 16;
		uint64_t type = trapgates ? 0x8f00 : 0x8e00;
		if (v == 3 || v == 4 || v == 0x80) type |= 0x6000;   /* DPL 3, as Linux has them */
		if (v == 0x1b) { if (!strcmp(gate1b, "np")) type &= ~0x8000ull; else if (!strcmp(gate1b, "dpl3")) type |= 0x6000; }
		idt[v * 2] = (h & 0xffff) | ((uint64_t)0x10 << 16) | (type << 32) | (((h >> 16) & 0xffff) << 48);
		idt[v * 2 + 1] = h >> 32;
	}
	wr64(V_RECPTR, G_RECS);
	wr64(V_URET, uret);
	wr64(V_VARIANT, variant);
	wr64(V_LOOPS, loops);
	wr64(V_ONLY, only);

	vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	run = mmap(NULL, ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0), PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	struct { struct kvm_cpuid2 c; struct kvm_cpuid_entry2 e[256]; } cp = {.c.nent = 256};
	ioctl(kvm, KVM_GET_SUPPORTED_CPUID, &cp); ioctl(vcpu, KVM_SET_CPUID2, &cp);

	/* The interface as the VMM sees it (KVM_GET_MSRS), and what that costs. */
	{
		uint32_t ids[] = {0x4b564d10, 0x4b564d11, 0x4b564d12, 0x4b564d13};
		struct { struct kvm_msrs m; struct kvm_msr_entry e[4]; } ms = {.m.nmsrs = 4};
		for (int i = 0; i < 4; i++) ms.e[i].index = ids[i];
		double a = now();
		int rc = ioctl(vcpu, KVM_GET_MSRS, &ms);
		double b = now();
		printf("VMM KVM_GET_MSRS 0x4b564d10-13: %d read in %.1f us:", rc, (b - a) * 1e6);
		for (int i = 0; i < rc && i < 4; i++) printf(" %x=%llx", ms.e[i].index, (unsigned long long)ms.e[i].data);
		printf("   (VM + vCPU set-up so far %.2f ms)\n", (b - t0) * 1e3);
		if (rc >= 4) tsc_khz = ms.e[3].data;
	}
	wr64(V_TSCKHZ, tsc_khz);
	wr64(V_IRQCHIP, irqchip);
	if (irqchip) {
		/* x2APIC on (so the guest EOIs with wrmsr 0x80b), software-enabled (SVR) */
		struct { struct kvm_msrs m; struct kvm_msr_entry e[1]; } ms = {.m.nmsrs = 1};
		ms.e[0].index = 0x1b; ms.e[0].data = 0xfee00000 | 0x100 | 0x800 | 0x400;
		if (ioctl(vcpu, KVM_SET_MSRS, &ms) != 1) perror("APIC_BASE x2APIC");
		struct kvm_lapic_state la;
		if (ioctl(vcpu, KVM_GET_LAPIC, &la) < 0) perror("KVM_GET_LAPIC");
		*(uint32_t *)(la.regs + 0xf0) = 0x1ff;
		if (ioctl(vcpu, KVM_SET_LAPIC, &la) < 0) perror("KVM_SET_LAPIC");
	}

	struct kvm_sregs s; ioctl(vcpu, KVM_GET_SREGS, &s);
	struct kvm_segment cs = {.base = 0, .limit = 0xfffff, .selector = 0x10, .type = 11, .present = 1, .s = 1, .l = 1, .g = 1};
	struct kvm_segment ds = {.base = 0, .limit = 0xfffff, .selector = 0x18, .type = 3, .present = 1, .db = 1, .s = 1, .g = 1};
	struct kvm_segment tr = {.base = G_TSS, .limit = 0x67, .selector = 0x40, .type = 11, .present = 1};
	s.cs = cs; s.ds = s.es = s.fs = s.gs = s.ss = ds; s.tr = tr;
	s.gdt.base = G_GDT; s.gdt.limit = 0x4f; s.idt.base = G_IDT; s.idt.limit = 0xfff;
	s.cr0 = 0x80000033; s.cr3 = G_KPML4; s.cr4 = 0x20; s.efer = 0xd01; /* LME LMA SCE NXE */
	if (ioctl(vcpu, KVM_SET_SREGS, &s) < 0) perror("KVM_SET_SREGS");
	struct kvm_regs g = {0};
	g.rip = G_CODE; g.rsp = G_KSTACK + 0x4000; g.rflags = 2;
	g.r15 = exp; g.r14 = stay_emulated ? 0 : vmmreg ? (uint64_t)-1 : (vif | 0x1000000);
	ioctl(vcpu, KVM_SET_REGS, &g);

	if (vmmreg) {
		struct { struct kvm_msrs m; struct kvm_msr_entry e[1]; } ms = {.m.nmsrs = 1};
		ms.e[0].index = 0x4b564d10; ms.e[0].data = G_VIF | vif;
		double a = now();
		int rc = ioctl(vcpu, KVM_SET_MSRS, &ms);
		double b = now();
		printf("VMM KVM_SET_MSRS 0x4b564d10 = %#llx before the first KVM_RUN: %d set (%.1f us)\n",
		       (unsigned long long)ms.e[0].data, rc, (b - a) * 1e6);
		ms.e[0].data = 0; rc = ioctl(vcpu, KVM_GET_MSRS, &ms);
		printf("VMM KVM_GET_MSRS 0x4b564d10 reads back %#llx (rc %d)\n", (unsigned long long)ms.e[0].data, rc);
		dump("sregs after KVM_SET_MSRS", 0);
	}

	double tstart = now(), tmark = 0;
	int pending = -1, timed = -1;
	struct itimerval watchdog = {.it_value = {.tv_sec = 10}};
	setitimer(ITIMER_REAL, &watchdog, 0);
	long exits = 0;
	for (;;) {
		if (pending >= 0 && irqchip) {
			int rc = send_msi(pending);
			if (!quiet) printf("  (VMM: KVM_SIGNAL_MSI %#x rc=%d; VIF if=%d pend=%d)\n", pending, rc, mem[G_VIF], mem[G_VIF + 1]);
			pending = -1;
		}
		if (pending >= 0) {
			struct kvm_interrupt ki = {.irq = pending};
			int ready = run->ready_for_interrupt_injection;
			int rc = ioctl(vcpu, KVM_INTERRUPT, &ki);
			if (!quiet) printf("  (VMM: KVM_INTERRUPT %#x rc=%d ready=%d; VIF if=%d pend=%d)\n", pending, rc, ready, mem[G_VIF], mem[G_VIF + 1]);
			pending = -1;
		}
		int rc = ioctl(vcpu, KVM_RUN, 0);
		exits++;
		if (rc < 0) {
			if (errno == EINTR && alarm_fired) {
				alarm_fired = 0;
				if (timed >= 0) { pending = timed; timed = -1; setitimer(ITIMER_REAL, &watchdog, 0); continue; }
				dump("WATCHDOG (10 s)", 0); print_records(); break;
			}
			if (errno == EINTR) continue;
			perror("KVM_RUN"); dump("KVM_RUN failed", 0); break;
		}
		if (run->exit_reason == KVM_EXIT_IO) {
			int p = run->io.port;
			uint8_t v = *((uint8_t *)run + run->io.data_offset);
			if (p == P_REPORT) { print_records(); continue; }
			if (p == P_DUMP) { dump("DUMP", v); continue; }
			if (p == P_INJECT) { pending = v; continue; }
			if (p == P_INJMS) {
				struct kvm_regs r; ioctl(vcpu, KVM_GET_REGS, &r);
				struct itimerval t = {.it_value = {.tv_sec = r.rbx / 1000, .tv_usec = (r.rbx % 1000) * 1000}};
				if (irqchip) {
					struct timed_msi *tm = malloc(sizeof *tm); pthread_t th;
					tm->vector = v; tm->ms = r.rbx;
					pthread_create(&th, 0, timed_msi_thread, tm); pthread_detach(th);
					continue;
				}
				timed = v; setitimer(ITIMER_REAL, &t, 0); continue;
			}
			if (p == P_KCHECK) { dump("KCHECK: this `out` ran in host kernel mode", v); continue; }
			if (p == P_END) { print_records(); if (!quiet) dump("END", v); break; }
			if (p == 0x80) continue;
			dump("unexpected out", p); continue;
		}
		if (run->exit_reason == KVM_EXIT_HLT) { if (!quiet) dump("KVM_EXIT_HLT", 0); if (timed >= 0 || pending >= 0 || exp == EXP_PRIV) continue; print_records(); break; }
		if (run->exit_reason == KVM_EXIT_IRQ_WINDOW_OPEN) continue;
		printf("EXIT reason %d", run->exit_reason);
		if (run->exit_reason == KVM_EXIT_SHUTDOWN) printf(" (shutdown: triple fault)");
		if (run->exit_reason == KVM_EXIT_INTERNAL_ERROR) {
			printf(" internal error suberror %d:", run->internal.suberror);
			for (unsigned j = 0; j < run->internal.ndata && j < 8; j++) printf(" %llx", run->internal.data[j]);
		}
		if (run->exit_reason == KVM_EXIT_FAIL_ENTRY) printf(" fail entry reason %llx", (unsigned long long)run->fail_entry.hardware_entry_failure_reason);
		if (run->exit_reason == KVM_EXIT_MMIO) printf(" mmio %s %llx", run->mmio.is_write ? "write" : "read", run->mmio.phys_addr);
		printf("\n");
		dump("exit", run->exit_reason);
		print_records();
		break;
	}
	(void)tmark;
	printf("run: %.3f s, %ld exits to the VMM\n", now() - tstart, exits);
	return 0;
}
