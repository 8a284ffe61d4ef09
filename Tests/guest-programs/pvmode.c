/* pvmode: how the guest kernel runs, as a user process can tell, and what one system call costs.
 *
 *   pvmode [--syscalls N]
 *
 * Prints one line of key=value pairs:
 *   native=1|0      the kernel says it runs natively on a PVM host's paravirtual interface
 *                   (the airlock_pv flag in /proc/cpuinfo, set by guest-kernel/patches/0010)
 *   pti=1|0         the kernel's page-table isolation is on (pti flag); PV mode needs it
 *   gsbase_ok=1|0   the process's GS base survives system calls, page faults, yields and
 *                   fork, set with arch_prctl and (where the kernel allows it) wrgsbase; PV mode
 *                   keeps it live in kernel mode instead of swapping it (guest-kernel/patches/0010)
 *   syscalls=N ns_per_getppid=T   N getppid() calls, timed with CLOCK_MONOTONIC
 * Runs on the host too (the benchmark compares the two). Built by the tests and bench with
 * gcc -O2 -static. Exit status 0; 2 if /proc/cpuinfo cannot be read. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <asm/prctl.h>
#include <sys/auxv.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <sched.h>

static unsigned long get_gs(void) {
	unsigned long v = 0;
	syscall(SYS_arch_prctl, ARCH_GET_GS, &v);
	return v;
}

/* Every way the kernel is entered and left, then the GS base must still be `want`. */
static int gs_survives(unsigned long want, int fsgsbase) {
	for (int i = 0; i < 100; i++) syscall(SYS_getppid);
	char *p = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED) return 0;
	for (int i = 0; i < (1 << 20); i += 4096) p[i] = 1;   /* page faults */
	munmap(p, 1 << 20);
	for (int i = 0; i < 100; i++) sched_yield();
	if (get_gs() != want) return 0;
	if (fsgsbase) {
		unsigned long live;
		__asm__ volatile("rdgsbase %0" : "=r"(live));
		if (live != want) return 0;
	}
	pid_t child = fork();
	if (child == 0) _exit(get_gs() == want ? 0 : 1);
	int status = 0;
	if (child < 0 || waitpid(child, &status, 0) != child) return 0;
	return WIFEXITED(status) && WEXITSTATUS(status) == 0 && get_gs() == want;
}

static int gsbase_checks(void) {
	int fsgsbase = (getauxval(AT_HWCAP2) & 2) != 0;   /* HWCAP2_FSGSBASE: the kernel switches them */
	unsigned long a = 0x00007f0012345000ul, b = 0x00007f00abcde000ul;
	if (syscall(SYS_arch_prctl, ARCH_SET_GS, a) != 0 || !gs_survives(a, fsgsbase)) return 0;
	if (fsgsbase) {
		__asm__ volatile("wrgsbase %0" : : "r"(b) : "memory");
		if (!gs_survives(b, fsgsbase)) return 0;
	}
	return syscall(SYS_arch_prctl, ARCH_SET_GS, 0ul) == 0 && gs_survives(0, fsgsbase);
}

static int flag(const char *flags, const char *name) {
	size_t n = strlen(name);
	for (const char *p = flags; (p = strstr(p, name)) != NULL; p += n)
		if ((p == flags || p[-1] == ' ') && (p[n] == ' ' || p[n] == '\n' || p[n] == 0)) return 1;
	return 0;
}

int main(int argc, char **argv) {
	long n = 100000;
	for (int i = 1; i < argc; i++)
		if (!strcmp(argv[i], "--syscalls") && i + 1 < argc) n = atol(argv[++i]);

	FILE *f = fopen("/proc/cpuinfo", "r");
	if (!f) { printf("pvmode: cannot read /proc/cpuinfo\n"); return 2; }
	static char line[16384];
	int native = 0, pti = 0;
	while (fgets(line, sizeof line, f))
		if (!strncmp(line, "flags", 5)) { native |= flag(line, "airlock_pv"); pti |= flag(line, "pti"); }
	fclose(f);

	int gsbase_ok = gsbase_checks();

	struct timespec a, b;
	clock_gettime(CLOCK_MONOTONIC, &a);
	for (long i = 0; i < n; i++) syscall(SYS_getppid);   /* not glibc's getppid(): never cached */
	clock_gettime(CLOCK_MONOTONIC, &b);
	double ns = ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / (n > 0 ? n : 1);
	printf("pvmode: native=%d pti=%d gsbase_ok=%d syscalls=%ld ns_per_getppid=%.1f\n", native, pti, gsbase_ok, n, ns);
	return 0;
}
