/* isolation: run as a user process in an Airlock guest, checks that user mode cannot reach
   guest-kernel memory. In PV mode on a PVM host the kernel runs at the same hardware privilege
   as user code, so this is what page-table isolation must deliver there; on other hosts the
   same checks hold through the ordinary supervisor bit.

   Each probe reads or writes an address with a SIGSEGV/SIGBUS handler armed and reports
   whether the access faulted. Kernel addresses come from /proc/kallsyms when it exists, else
   from the fixed x86-64 layout (kernel text at 0xffffffff81000000, the direct map at
   0xffff888000000000, the CPU entry area at 0xfffffe0000000000). The CPU entry area's pages
   that PV mode must leave mapped are checked for what user code may do with them: the IDT,
   GDT and TSS read-only; the entry stack writable (it holds nothing while user code runs),
   and writing garbage there must not hurt the kernel.

   Output: one line per probe, "ok" or "FAIL", then "isolation: N failures". Exit status 0
   only if nothing failed. Built by the tests (gcc -O2 -static) and fed to the guest on stdin. */
#define _GNU_SOURCE
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/wait.h>

static sigjmp_buf env;
static volatile int faulted;
static void on_fault(int sig) { faulted = sig; siglongjmp(env, 1); }

/* 1 if reading a byte at p faults */
static int read_faults(volatile const uint8_t *p, uint8_t *out) {
	faulted = 0;
	if (sigsetjmp(env, 1) == 0) { uint8_t v = *p; if (out) *out = v; return 0; }
	return 1;
}

/* 1 if writing the byte back faults (the value is restored when it did not) */
static int write_faults(volatile uint8_t *p) {
	faulted = 0;
	if (sigsetjmp(env, 1) == 0) { uint8_t v = *p; *p = v; return 0; }
	return 1;
}

static int failures;
static void expect(int ok, const char *what, uintptr_t addr) {
	printf("%s %s (%#lx)\n", ok ? "ok  " : "FAIL", what, (unsigned long)addr);
	if (!ok) failures++;
}

static int in_pv_mode(void) {
	FILE *f = fopen("/proc/cpuinfo", "r");
	char line[8192];
	int pv = 0;
	if (!f) return 0;
	while (fgets(line, sizeof line, f))
		if (!strncmp(line, "flags", 5) && strstr(line, " airlock_pv")) pv = 1;
	fclose(f);
	return pv;
}

int main(void) {
	struct sigaction sa = {0};
	sa.sa_handler = on_fault;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGSEGV, &sa, 0);
	sigaction(SIGBUS, &sa, 0);
	int pv = in_pv_mode();
	printf("mode: %s\n", pv ? "PV (native on a PVM host)" : "not PV");

	/* Kernel text, data, the direct map, vmalloc, the fixmap: not mapped for user mode at all. */
	static const struct { uintptr_t addr; const char *what; } kernel[] = {
		{0xffffffff81000000ul, "kernel text (start)"},
		{0xffffffff81800000ul, "kernel text (inside)"},
		{0xffffffff82000000ul, "kernel data/bss"},
		{0xffff888000000000ul, "direct map: guest-physical 0"},
		{0xffff888001000000ul, "direct map: the kernel image (16 MiB)"},
		{0xffff8880000a0000ul, "direct map: the VMM's boot VIF page"},
		{0xffffc90000000000ul, "vmalloc area"},
		{0xffffffffff5ff000ul, "fixmap"},
	};
	for (unsigned i = 0; i < sizeof kernel / sizeof kernel[0]; i++) {
		expect(read_faults((const uint8_t *)kernel[i].addr, 0), kernel[i].what, kernel[i].addr);
		expect(write_faults((uint8_t *)kernel[i].addr), kernel[i].what, kernel[i].addr);
	}

	/* The CPU entry area (arch/x86/include/asm/cpu_entry_area.h, 6.1, 64-bit): the read-only
	   IDT page first, then per CPU: the GDT page, the entry stack page, the TSS, the exception
	   stacks. */
	const uintptr_t cea = 0xfffffe0000000000ul;
	const uintptr_t percpu = cea + 0x1000;   /* CPU_ENTRY_AREA_PER_CPU */
	uint8_t b;
	int idt_readable = !read_faults((const uint8_t *)cea, &b);
	if (pv) {
		/* PV mode: these must stay mapped (the host reads them through the user page tables),
		   carry the user bit, and are read-only. */
		expect(idt_readable, "CPU entry area: IDT readable (PV mode keeps it mapped)", cea);
		expect(write_faults((uint8_t *)cea), "CPU entry area: IDT not writable", cea);
		expect(write_faults((uint8_t *)percpu), "CPU entry area: GDT not writable", percpu);
		/* TSS at +0x2000 of the per-CPU area; RSP0 at offset 4, IST1 at 0x24 */
		expect(!read_faults((const uint8_t *)percpu + 0x2004, 0), "CPU entry area: TSS readable", percpu + 0x2004);
		expect(write_faults((uint8_t *)percpu + 0x2004), "CPU entry area: TSS.RSP0 not writable", percpu + 0x2004);
		expect(write_faults((uint8_t *)percpu + 0x2024), "CPU entry area: TSS.IST1 not writable", percpu + 0x2024);
		/* The entry stack (TSS.RSP0 points at its top) is writable by design: garbage there
		   is overwritten by the next event's frame. Fill it and check the kernel survives. */
		volatile uint8_t *stack = (uint8_t *)percpu + 0x1000;
		faulted = 0;
		if (sigsetjmp(env, 1) == 0) {
			for (int i = 0; i < 4096; i++) stack[i] = 0xa5;
			int survivors = 0;
			for (int i = 0; i < 100; i++) { pid_t p = fork(); if (p == 0) _exit(7); int st; waitpid(p, &st, 0); survivors += WIFEXITED(st) && WEXITSTATUS(st) == 7; }
			expect(survivors == 100, "entry stack filled with garbage: 100 fork+wait afterwards", (uintptr_t)stack);
		} else {
			printf("note: the entry stack page faulted on write (signal %d)\n", faulted);
		}
	} else {
		expect(!idt_readable, "CPU entry area: IDT not readable", cea);
		expect(read_faults((const uint8_t *)percpu + 0x2004, 0), "CPU entry area: TSS not readable", percpu + 0x2004);
	}

	printf("isolation: %d failures\n", failures);
	return failures ? 1 : 0;
}
