// vecstress: do guest processes keep their own vector registers across context switches?
//
// Built by the tests (gcc -O2 -static -nostdlib -fno-stack-protector) and run inside the
// guest, so it needs no libc and no file in the image. Several processes each load distinct
// values into every vector register the CPU has enabled (xmm0-15; ymm0-15 with AVX;
// zmm0-31 and k0-7 with AVX-512), give up the CPU (sched_yield, or spinning until the timer
// preempts them), then read the registers back and compare. It also checks PKRU and the GS
// base the same way where the CPU offers them, and that a state component CPUID advertises
// but XCR0 leaves off is refused by the hardware (SIGILL), as on real hardware.
//
//   vecstress [--procs N] [--rounds R] [--yields Y] [--spin-ms MS] [--min-timer N]    the stress test
//   vecstress --pingpong N                                            time N yield round trips
//   vecstress --audit        what else CPUID promises user code (RDPID/RDTSCP's TSC_AUX against
//                            getcpu, RDRAND/RDSEED, PKU, AMX, FSGSBASE) and whether it holds
//
// Prints one line of key=value pairs; exits 0 when every register survived, 1 when any
// changed, 2 when the hardware let a process use state the OS left off (OSXSAVE, XCR0).
typedef unsigned long u64;
typedef unsigned int u32;
typedef unsigned char u8;
typedef long i64;

#define SYS_write 1
#define SYS_sched_yield 24
#define SYS_getpid 39
#define SYS_fork 57
#define SYS_exit_group 231
#define SYS_wait4 61
#define SYS_getrusage 98
#define SYS_clock_gettime 228
#define SYS_arch_prctl 158
#define SYS_mmap 9

static i64 sys6(i64 n, i64 a, i64 b, i64 c, i64 d, i64 e, i64 f) {
    i64 r;
    register i64 r10 __asm__("r10") = d;
    register i64 r8 __asm__("r8") = e;
    register i64 r9 __asm__("r9") = f;
    __asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9) : "rcx", "r11", "memory");
    return r;
}
static i64 sys(i64 n, i64 a, i64 b, i64 c, i64 d) { return sys6(n, a, b, c, d, -1, 0); }

static u64 strlen_(const char *s) { u64 n = 0; while (s[n]) n++; return n; }
static void puts_(const char *s) { sys(SYS_write, 1, (i64)s, strlen_(s), 0); }
static void putu(u64 v) { char b[24]; int i = 23; b[i] = 0; do { b[--i] = '0' + v % 10; v /= 10; } while (v); puts_(b + i); }
static void puthex(u64 v) { char b[20]; int i = 19; b[i] = 0; do { b[--i] = "0123456789abcdef"[v & 15]; v >>= 4; } while (v); b[--i] = 'x'; b[--i] = '0'; puts_(b + i); }
static void kv(const char *k, u64 v) { puts_(" "); puts_(k); puts_("="); putu(v); }
static int streq(const char *a, const char *b) { while (*a && *a == *b) { a++; b++; } return *a == *b; }
static u64 atou(const char *s) { u64 v = 0; while (*s >= '0' && *s <= '9') v = v * 10 + (u64)(*s++ - '0'); return v; }

static void cpuid(u32 leaf, u32 sub, u32 r[4]) {
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}
static u64 xgetbv0(void) { u32 a, d; __asm__ volatile("xgetbv" : "=a"(a), "=d"(d) : "c"(0)); return ((u64)d << 32) | a; }
static u64 now_ns(void) { i64 ts[2]; sys(SYS_clock_gettime, 1, (i64)ts, 0, 0); return (u64)ts[0] * 1000000000ul + (u64)ts[1]; }

// The register file as this program lays it out: 32 slots of 64 bytes (xmm uses the first
// 16 of a slot, ymm the first 32, zmm all 64), then k0-k7, then PKRU and the GS base.
#define SLOTS 32
struct regs { u8 v[SLOTS][64]; u64 k[8]; u64 pkru; u64 gsbase; } __attribute__((aligned(64)));

// One round in assembly, so the compiler never touches a vector register in between:
// load every register from *p, then `iters` times either sched_yield (mode 0) or a spin
// (mode 1, long enough for the timer to preempt), then store every register to *q.
// Arguments: rdi = p, rsi = q, rdx = mode, rcx = iters.
#define ROUND(name, LOAD, STORE)                                                 \
    __asm__(".text\n.globl " #name "\n" #name ":\n"                               \
            "push %rbx\n push %r12\n push %r13\n"                                \
            "mov %rdi, %r12\n mov %rsi, %r13\n mov %rcx, %rbx\n mov %rdx, %r8\n" \
            LOAD                                                                 \
            "1: test %rbx, %rbx\n jz 3f\n"                                        \
            "test %r8, %r8\n jnz 2f\n"                                           \
            "mov $24, %eax\n syscall\n dec %rbx\n jmp 1b\n"                      \
            "2: dec %rbx\n jmp 1b\n"                                             \
            "3:\n" STORE                                                         \
            "pop %r13\n pop %r12\n pop %rbx\n ret\n");

#define X16(op, fmt) ".irp i,0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15\n" op "\n.endr\n"
#define X32(op) ".irp i,0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31\n" op "\n.endr\n"
#define K8(op) ".irp i,0,1,2,3,4,5,6,7\n" op "\n.endr\n"
ROUND(vs_sse, X16("movdqu \\i*64(%r12), %xmm\\i", 0), X16("movdqu %xmm\\i, \\i*64(%r13)", 0))
ROUND(vs_avx, X16("vmovdqu \\i*64(%r12), %ymm\\i", 0), X16("vmovdqu %ymm\\i, \\i*64(%r13)", 0))
ROUND(vs_avx512, X32("vmovdqu64 \\i*64(%r12), %zmm\\i") K8("kmovq 2048+\\i*8(%r12), %k\\i"),
      X32("vmovdqu64 %zmm\\i, \\i*64(%r13)") K8("kmovq %k\\i, 2048+\\i*8(%r13)"))
void vs_sse(struct regs *, struct regs *, u64, u64);
void vs_avx(struct regs *, struct regs *, u64, u64);
void vs_avx512(struct regs *, struct regs *, u64, u64);

static u64 rdpkru_(void) { u32 a, d; __asm__ volatile(".byte 0x0f,0x01,0xee" : "=a"(a), "=d"(d) : "c"(0)); return a; }
static void wrpkru_(u32 v) { __asm__ volatile(".byte 0x0f,0x01,0xef" :: "a"(v), "c"(0), "d"(0)); }
static u64 rdgsbase_(void) { u64 v; __asm__ volatile("rdgsbase %0" : "=r"(v)); return v; }
static void wrgsbase_(u64 v) { __asm__ volatile("wrgsbase %0" :: "r"(v)); }

enum { SSE = 1, AVX = 2, AVX512 = 4 };
static int features, pkru_ok, gsbase_ok;

// Per child, in a shared page: registers found changed, and the switches seen in the yield
// rounds and in the spin rounds (those are the timer's preemptions).
struct counts { u64 changed, yield_switches, timer_switches; };
static struct counts *shared;

struct rusage_ { i64 utime[2], stime[2]; i64 maxrss, ixrss, idrss, isrss, minflt, majflt, nswap, inblock, oublock, msgsnd, msgrcv, nsignals, nvcsw, nivcsw; };
static u64 switches_so_far(void) { struct rusage_ ru = {0}; sys(SYS_getrusage, 0, (i64)&ru, 0, 0); return (u64)(ru.nvcsw + ru.nivcsw); }

static u64 mix(u64 x) { x += 0x9e3779b97f4a7c15ul; x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ul; x = (x ^ (x >> 27)) * 0x94d049bb133111ebul; return x ^ (x >> 31); }

// One process's share: rounds of load / give up the CPU / compare. Returns the number of
// registers found changed.
// Past `rounds` it goes on (up to 8 times as many) until the timer has preempted it
// `min_timer` times: a busy host delivers fewer ticks to a spinning vCPU.
static u64 worker(u64 seed, u64 rounds, u64 yields, u64 spin_iters, u64 min_timer, struct counts *out) {
    static struct regs p, q;
    u64 bad = 0;
    for (u64 r = 0; r < rounds || (out->timer_switches < min_timer && r < rounds * 8); r++) {
        u64 x = mix(seed * 1000003u + r);
        for (int s = 0; s < SLOTS; s++)
            for (int b = 0; b < 64; b += 8) { x = mix(x); *(u64 *)&p.v[s][b] = x; }
        for (int k = 0; k < 8; k++) { x = mix(x); p.k[k] = x; }
        // Keys 0's bits stay clear (every page here has key 0), the rest are this process's own.
        x = mix(x); p.pkru = x & 0xfffffffcu;
        x = mix(x); p.gsbase = (x & 0x00007ffffffff000ul);
        if (pkru_ok) wrpkru_((u32)p.pkru);
        if (gsbase_ok) wrgsbase_(p.gsbase);
        u64 mode = (r & 1) ? 1 : 0, iters = mode ? spin_iters : yields;
        u64 before = switches_so_far();
        if (features & AVX512) vs_avx512(&p, &q, mode, iters);
        else if (features & AVX) vs_avx(&p, &q, mode, iters);
        else vs_sse(&p, &q, mode, iters);
        u64 seen = switches_so_far() - before;
        if (mode) out->timer_switches += seen; else out->yield_switches += seen;
        q.pkru = pkru_ok ? rdpkru_() : p.pkru;
        q.gsbase = gsbase_ok ? rdgsbase_() : p.gsbase;
        int width = (features & AVX512) ? 64 : (features & AVX) ? 32 : 16;
        int slots = (features & AVX512) ? 32 : 16;
        for (int s = 0; s < slots; s++)
            for (int b = 0; b < width; b++) if (p.v[s][b] != q.v[s][b]) { bad++; break; }
        if (features & AVX512) for (int k = 0; k < 8; k++) if (p.k[k] != q.k[k]) bad++;
        if (p.pkru != q.pkru) bad++;
        if (p.gsbase != q.gsbase) bad++;
    }
    if (pkru_ok) wrpkru_(0);
    out->changed = bad;
    return bad;
}

static int wait_child(i64 pid) { int status = 0; sys(SYS_wait4, pid, (i64)&status, 0, 0); return status; }

// Runs `probe` in a child: 1 when the child died of SIGILL (refused), 0 when it ran.
static int refused(void (*probe)(void)) {
    i64 pid = sys(SYS_fork, 0, 0, 0, 0);
    if (pid == 0) { probe(); sys(SYS_exit_group, 0, 0, 0, 0); }
    int st = wait_child(pid);
    return (st & 0x7f) == 4;  // SIGILL
}
static void use_avx(void) { __asm__ volatile("vpxor %%ymm1, %%ymm1, %%ymm1" ::: "xmm1"); }
static void use_avx512(void) { __asm__ volatile("vpxord %%zmm1, %%zmm1, %%zmm1" ::: "xmm1"); }

static u64 auxv_hwcap2;

// --audit: what else the CPUID this guest sees promises to user code, and whether it holds.
static void use_wrpkru(void) { wrpkru_(0); }
static u8 tilecfg[64] __attribute__((aligned(64))) = {1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0};
static void use_amx(void) { tilecfg[48] = 16; __asm__ volatile("ldtilecfg %0\n tilerelease" :: "m"(tilecfg)); }
static void use_rdpid(void) { u64 v; __asm__ volatile("rdpid %0" : "=r"(v)); }
static int audit(void) {
    u32 r1[4], r7[4], e1[4];
    cpuid(1, 0, r1); cpuid(7, 0, r7); cpuid(0x80000001, 0, e1);
    u32 cpu = 99, node = 99;
    sys(309, (i64)&cpu, (i64)&node, 0, 0);  // getcpu
    puts_("cpuaudit:"); kv("getcpu", cpu); kv("node", node);
    if ((r7[2] >> 22) & 1) {  // RDPID
        if (refused(use_rdpid)) puts_(" rdpid=refused");
        else { u64 v; __asm__ volatile("rdpid %0" : "=r"(v)); kv("rdpid", v); }
    }
    if ((e1[3] >> 27) & 1) {  // RDTSCP
        u32 a, d, c; __asm__ volatile("rdtscp" : "=a"(a), "=d"(d), "=c"(c)); kv("rdtscp_aux", c);
    }
    if ((r1[2] >> 30) & 1) { u8 ok; u64 v; __asm__ volatile("rdrand %0; setc %1" : "=r"(v), "=qm"(ok)); kv("rdrand_ok", ok); }
    if ((r7[1] >> 18) & 1) { u8 ok = 0; u64 v; for (int i = 0; i < 100 && !ok; i++) __asm__ volatile("rdseed %0; setc %1" : "=r"(v), "=qm"(ok)); kv("rdseed_ok", ok); }
    kv("pku_cpuid", (r7[2] >> 3) & 1); kv("ospke", (r7[2] >> 4) & 1); kv("wrpkru_executes", !refused(use_wrpkru));
    kv("amx_cpuid", (r7[3] >> 24) & 1); kv("amx_executes", !refused(use_amx));
    kv("fsgsbase_cpuid", r7[1] & 1); kv("fsgsbase_hwcap2", (auxv_hwcap2 >> 1) & 1);
    puts_("\n");
    return 0;
}

static int pingpong(u64 n) {
    i64 pid = sys(SYS_fork, 0, 0, 0, 0);
    u64 t0 = now_ns();
    for (u64 i = 0; i < n; i++) sys(SYS_sched_yield, 0, 0, 0, 0);
    if (pid == 0) sys(SYS_exit_group, 0, 0, 0, 0);
    u64 t1 = now_ns();
    wait_child(pid);
    puts_("vecstress: pingpong"); kv("yields", n); kv("ns_per_switch", (t1 - t0) / (2 * n)); puts_("\n");
    return 0;
}

int main(int argc, char **argv) {
    u64 procs = 4, rounds = 40, yields = 50, spin_ms = 30, min_timer = 0;
    for (int i = 1; i < argc; i++) {
        if (streq(argv[i], "--pingpong") && i + 1 < argc) return pingpong(atou(argv[++i]));
        else if (streq(argv[i], "--audit")) return audit();
        else if (streq(argv[i], "--procs") && i + 1 < argc) procs = atou(argv[++i]);
        else if (streq(argv[i], "--rounds") && i + 1 < argc) rounds = atou(argv[++i]);
        else if (streq(argv[i], "--yields") && i + 1 < argc) yields = atou(argv[++i]);
        else if (streq(argv[i], "--spin-ms") && i + 1 < argc) spin_ms = atou(argv[++i]);
        else if (streq(argv[i], "--min-timer") && i + 1 < argc) min_timer = atou(argv[++i]);
        else { puts_("vecstress: unknown argument "); puts_(argv[i]); puts_("\n"); return 64; }
    }
    u32 r1[4], r7[4];
    cpuid(1, 0, r1);
    cpuid(7, 0, r7);
    int osxsave = (r1[2] >> 27) & 1, cpu_avx = (r1[2] >> 28) & 1, cpu_avx512 = (r7[1] >> 16) & 1;
    int cpu_pku = (r7[2] >> 3) & 1, cpu_ospke = (r7[2] >> 4) & 1, cpu_fsgsbase = r7[1] & 1;
    u64 xcr0 = osxsave ? xgetbv0() : 3;
    // What the OS enabled (CPUID's OSXSAVE and XCR0), and what actually executes: a component
    // CPUID promises but the OS leaves off must fault, as on real hardware. Whatever executes
    // is stress-tested, enabled or not, since a program that uses it needs it switched.
    int enabled = SSE;
    if (cpu_avx && (xcr0 & 6) == 6) enabled |= AVX;
    if (cpu_avx512 && (xcr0 & 0xe6) == 0xe6) enabled |= AVX512;
    features = SSE;
    if (cpu_avx && ((enabled & AVX) || !refused(use_avx))) features |= AVX;
    if (cpu_avx512 && (features & AVX) && ((enabled & AVX512) || !refused(use_avx512))) features |= AVX512;
    int leak = features != enabled;
    pkru_ok = cpu_pku && cpu_ospke && (xcr0 & 0x200);
    gsbase_ok = cpu_fsgsbase && (auxv_hwcap2 & 2);  // the kernel says it switches FS/GS bases

    // Calibrate the spin: iterations per millisecond of this CPU.
    u64 t0 = now_ns();
    __asm__ volatile("mov $10000000, %%rcx\n1: dec %%rcx\n jnz 1b" ::: "rcx");
    u64 per_ms = 10000000ul * 1000000ul / ((now_ns() - t0) | 1);
    u64 spin_iters = per_ms * spin_ms;

    i64 pids[64];
    if (procs > 64) procs = 64;
    // MAP_SHARED | MAP_ANONYMOUS: one page the children report into.
    shared = (struct counts *)sys(SYS_mmap, 0, 4096, 3, 0x21);
    if ((i64)shared < 0) { puts_("vecstress: mmap failed\n"); return 64; }
    for (u64 i = 0; i < procs; i++) {
        pids[i] = sys(SYS_fork, 0, 0, 0, 0);
        if (pids[i] == 0) {
            u64 bad = worker(i + 1, rounds, yields, spin_iters, (min_timer + procs - 1) / procs, &shared[i]);
            sys(SYS_exit_group, bad ? 1 : 0, 0, 0, 0);
        }
    }
    u64 bad = 0, died = 0, yield_switches = 0, timer_switches = 0;
    for (u64 i = 0; i < procs; i++) {
        int st = wait_child(pids[i]);
        if (st & 0x7f) died++;  // killed by a signal: its registers were not its own either
        bad += shared[i].changed;
        yield_switches += shared[i].yield_switches;
        timer_switches += shared[i].timer_switches;
    }
    puts_("vecstress:"); puts_(" cpuid1.ecx="); puthex(r1[2]); puts_(" cpuid7.ebx="); puthex(r7[1]); puts_(" cpuid7.ecx="); puthex(r7[2]);
    puts_(" cpuid7.edx="); puthex(r7[3]); puts_(" xcr0="); puthex(xcr0);
    puts_(" regs="); puts_((features & AVX512) ? "zmm0-31,k0-7" : (features & AVX) ? "ymm0-15" : "xmm0-15");
    kv("pkru", pkru_ok); kv("gsbase", gsbase_ok);
    kv("procs", procs); kv("rounds", rounds); kv("yield_switches", yield_switches); kv("timer_switches", timer_switches);
    kv("changed", bad); kv("died", died); puts_(leak ? " unenabled_state_usable=yes" : " unenabled_state_usable=no"); puts_("\n");
    return (bad || died) ? 1 : leak ? 2 : 0;
}

// The entry point: argc, argv and the auxiliary vector from the initial stack.
__asm__(".text\n.globl _start\n_start:\n xor %ebp, %ebp\n mov %rsp, %rdi\n and $-16, %rsp\n call start_c\n hlt\n");
void start_c(u64 *sp) {
    int argc = (int)sp[0];
    char **argv = (char **)(sp + 1);
    u64 *p = sp + 1 + argc + 1;
    while (*p) p++;  // environment
    for (p++; p[0]; p += 2) if (p[0] == 26) auxv_hwcap2 = p[1];  // AT_HWCAP2
    sys(SYS_exit_group, main(argc, argv), 0, 0, 0);
}
