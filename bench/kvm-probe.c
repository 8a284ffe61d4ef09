/* An LD_PRELOAD probe that times a VMM process (Airlock's or QEMU's) from its
 * exec to its first KVM_RUN, without a hook in the VMM.
 *
 * It interposes ioctl(2): the first KVM ioctl of any kind, KVM_CREATE_VM and
 * the first KVM_RUN are stamped with CLOCK_MONOTONIC (the clock Airlock's
 * MachineTimings use), and at the first KVM_RUN, before the call, it writes one
 * JSON line to $AIRLOCK_BENCH_PROBE_OUT with those stamps, the process's CPU
 * time so far (getrusage(RUSAGE_SELF): every thread) and its resident memory.
 * With AIRLOCK_BENCH_PROBE_EXIT=1 it then ends the process (_exit(0)) instead of
 * entering the guest, for measuring start-up alone.
 *
 * exec-timed (bench/exec-timed.c) stamps the moment before execve into
 * $AIRLOCK_BENCH_T0_NS, and its own CPU time into $AIRLOCK_BENCH_T0_CPU_US, so
 * the figures start at the VMM's exec and leave out the launcher.
 *
 *   gcc -O2 -shared -fPIC -o kvm-probe.so bench/kvm-probe.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#define KVM_IOCTL_TYPE 0xAE
#define KVM_CREATE_VM_NR 0x01
#define KVM_RUN_NR 0x80
#define KVM_SET_REGS_NR 0x82
#define KVM_SET_LAPIC_NR 0x8f

static uint64_t loaded_ns;
static _Atomic uint64_t first_kvm_ns, create_vm_ns;
static atomic_flag reported = ATOMIC_FLAG_INIT;
/* Stamps (ns) and CPU time so far (us) at the last KVM_SET_LAPIC and the last
 * KVM_SET_REGS before the first KVM_RUN: Airlock's machine set-up ends with the
 * vCPU's LAPIC and its kernel load with the entry registers. */
static _Atomic int run_seen;
static _Atomic uint64_t lapic_ns, lapic_cpu_us, regs_ns, regs_cpu_us, create_vm_cpu_us;
static int (*real_ioctl)(int, unsigned long, void *);

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

__attribute__((constructor)) static void probe_init(void) {
    loaded_ns = now_ns();
    real_ioctl = (int (*)(int, unsigned long, void *))dlsym(RTLD_NEXT, "ioctl");
}

static long rss_kib(void) {
    FILE *f = fopen("/proc/self/statm", "r");
    long size = 0, resident = 0;
    if (f) {
        if (fscanf(f, "%ld %ld", &size, &resident) != 2) resident = 0;
        fclose(f);
    }
    return resident * (sysconf(_SC_PAGESIZE) / 1024);
}

static uint64_t cpu_us(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (uint64_t)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000u + (uint64_t)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
}

static void report_first_run(uint64_t t) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    const char *t0 = getenv("AIRLOCK_BENCH_T0_NS");
    const char *t0cpu = getenv("AIRLOCK_BENCH_T0_CPU_US");
    const char *out = getenv("AIRLOCK_BENCH_PROBE_OUT");
    char line[512];
    int n = snprintf(line, sizeof line,
        "{\"t0_ns\": %s, \"launcher_cpu_us\": %s, \"loaded_ns\": %llu, \"first_kvm_ioctl_ns\": %llu, "
        "\"create_vm_ns\": %llu, \"first_run_ns\": %llu, \"utime_us\": %lld, \"stime_us\": %lld, "
        "\"rss_kib\": %ld, \"minflt\": %ld, \"pid\": %d, \"create_vm_cpu_us\": %llu, "
        "\"last_set_lapic_ns\": %llu, \"last_set_lapic_cpu_us\": %llu, \"last_set_regs_ns\": %llu, \"last_set_regs_cpu_us\": %llu}\n",
        t0 ? t0 : "null", t0cpu ? t0cpu : "0", (unsigned long long)loaded_ns,
        (unsigned long long)atomic_load(&first_kvm_ns), (unsigned long long)atomic_load(&create_vm_ns),
        (unsigned long long)t,
        (long long)ru.ru_utime.tv_sec * 1000000 + ru.ru_utime.tv_usec,
        (long long)ru.ru_stime.tv_sec * 1000000 + ru.ru_stime.tv_usec,
        rss_kib(), ru.ru_minflt, (int)getpid(), (unsigned long long)atomic_load(&create_vm_cpu_us),
        (unsigned long long)atomic_load(&lapic_ns), (unsigned long long)atomic_load(&lapic_cpu_us),
        (unsigned long long)atomic_load(&regs_ns), (unsigned long long)atomic_load(&regs_cpu_us));
    if (out && n > 0) {
        int fd = open(out, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
        if (fd >= 0) {
            ssize_t w = write(fd, line, (size_t)n);
            (void)w;
            close(fd);
        }
    }
    const char *ex = getenv("AIRLOCK_BENCH_PROBE_EXIT");
    if (ex && strcmp(ex, "1") == 0) _exit(0);
}

int ioctl(int fd, unsigned long request, ...) {
    va_list ap;
    va_start(ap, request);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    if (((request >> 8) & 0xFF) == KVM_IOCTL_TYPE) {
        uint64_t t = now_ns();
        uint64_t zero = 0;
        atomic_compare_exchange_strong(&first_kvm_ns, &zero, t);
        unsigned nr = request & 0xFF;
        zero = 0;
        if (nr == KVM_CREATE_VM_NR && atomic_compare_exchange_strong(&create_vm_ns, &zero, t))
            atomic_store(&create_vm_cpu_us, cpu_us());
        if (!atomic_load(&run_seen)) {
            if (nr == KVM_SET_LAPIC_NR) { atomic_store(&lapic_ns, t); atomic_store(&lapic_cpu_us, cpu_us()); }
            if (nr == KVM_SET_REGS_NR) { atomic_store(&regs_ns, t); atomic_store(&regs_cpu_us, cpu_us()); }
        }
        if (nr == KVM_RUN_NR && !atomic_flag_test_and_set(&reported)) {
            atomic_store(&run_seen, 1);
            report_first_run(t);
        }
    }
    if (!real_ioctl) real_ioctl = (int (*)(int, unsigned long, void *))dlsym(RTLD_NEXT, "ioctl");
    return real_ioctl(fd, request, arg);
}
