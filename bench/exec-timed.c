/* exec-timed PROGRAM [ARGS...]: stamps CLOCK_MONOTONIC (ns) and this process's
 * CPU time (us) into AIRLOCK_BENCH_T0_NS and AIRLOCK_BENCH_T0_CPU_US, then
 * execs PROGRAM in the same process. bench/kvm-probe.c reads both, so its
 * figures run from the VMM's exec and leave out the benchmark's own fork.
 *
 *   gcc -O2 -o exec-timed bench/exec-timed.c
 */
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: exec-timed PROGRAM [ARGS...]\n");
        return 2;
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    char cpu[32], t0[32];
    snprintf(cpu, sizeof cpu, "%lld",
             (long long)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000 + ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
    setenv("AIRLOCK_BENCH_T0_CPU_US", cpu, 1);
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    snprintf(t0, sizeof t0, "%llu", (unsigned long long)ts.tv_sec * 1000000000ull + (unsigned long long)ts.tv_nsec);
    setenv("AIRLOCK_BENCH_T0_NS", t0, 1);
    execvp(argv[1], argv + 1);
    perror(argv[1]);
    return 127;
}
