/* pvmode: how the guest kernel runs, as a user process can tell, and what one system call costs.
 *
 *   pvmode [--syscalls N]
 *
 * Prints one line of key=value pairs:
 *   native=1|0      the kernel says it runs natively on a PVM host's paravirtual interface
 *                   (the airlock_pv flag in /proc/cpuinfo, set by guest-kernel/patches/0010)
 *   pti=1|0         the kernel's page-table isolation is on (pti flag); PV mode needs it
 *   syscalls=N ns_per_getppid=T   N getppid() calls, timed with CLOCK_MONOTONIC
 * Runs on the host too (the benchmark compares the two). Built by the tests and bench with
 * gcc -O2 -static. Exit status 0; 2 if /proc/cpuinfo cannot be read. */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>

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

	struct timespec a, b;
	clock_gettime(CLOCK_MONOTONIC, &a);
	for (long i = 0; i < n; i++) syscall(SYS_getppid);   /* not glibc's getppid(): never cached */
	clock_gettime(CLOCK_MONOTONIC, &b);
	double ns = ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / (n > 0 ? n : 1);
	printf("pvmode: native=%d pti=%d syscalls=%ld ns_per_getppid=%.1f\n", native, pti, n, ns);
	return 0;
}
