#define _GNU_SOURCE
#include "CJailShim.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/filter.h>
#include <malloc.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <linux/securebits.h>
#include <unistd.h>

const int AIRLOCK_CLONE_NEWNS = CLONE_NEWNS;
const int AIRLOCK_CLONE_NEWPID = CLONE_NEWPID;
const int AIRLOCK_CLONE_NEWIPC = CLONE_NEWIPC;
const int AIRLOCK_CLONE_NEWUTS = CLONE_NEWUTS;
const int AIRLOCK_CLONE_NEWNET = CLONE_NEWNET;
const int AIRLOCK_CLONE_NEWUSER = CLONE_NEWUSER;
const int AIRLOCK_CLONE_NEWCGROUP = CLONE_NEWCGROUP;
const int AIRLOCK_CLONE_THREAD = CLONE_THREAD;

const unsigned long AIRLOCK_MS_RDONLY = MS_RDONLY;
const unsigned long AIRLOCK_MS_NOSUID = MS_NOSUID;
const unsigned long AIRLOCK_MS_NODEV = MS_NODEV;
const unsigned long AIRLOCK_MS_NOEXEC = MS_NOEXEC;
const unsigned long AIRLOCK_MS_BIND = MS_BIND;
const unsigned long AIRLOCK_MS_REC = MS_REC;
const unsigned long AIRLOCK_MS_PRIVATE = MS_PRIVATE;
const unsigned long AIRLOCK_MS_REMOUNT = MS_REMOUNT;
const int AIRLOCK_MNT_DETACH = MNT_DETACH;

const unsigned int AIRLOCK_SECCOMP_SET_MODE_FILTER = SECCOMP_SET_MODE_FILTER;
const unsigned int AIRLOCK_SECCOMP_FILTER_FLAG_TSYNC = SECCOMP_FILTER_FLAG_TSYNC;

int airlock_jail_unshare(int flags) { return unshare(flags); }

int airlock_jail_mount(const char *source, const char *target, const char *fstype,
                       unsigned long flags, const char *data) {
    return mount(source, target, fstype, flags, data);
}

int airlock_jail_umount2(const char *target, int flags) { return umount2(target, flags); }

int airlock_jail_pivot_root(const char *new_root, const char *put_old) {
    return (int)syscall(SYS_pivot_root, new_root, put_old);
}

int airlock_jail_mknod_char(const char *path, unsigned int mode, unsigned int major, unsigned int minor) {
    return mknod(path, S_IFCHR | mode, makedev(major, minor));
}

int airlock_jail_sethostname(const char *name) { return sethostname(name, strlen(name)); }

int airlock_jail_close_range(unsigned int first, unsigned int last) {
    return (int)syscall(SYS_close_range, first, last, 0);
}

// clearenv() leaves `environ` NULL, which Swift's Glibc.environ (an
// implicitly unwrapped pointer) traps on: point it at an empty list instead.
static char *airlock_empty_environment[] = { NULL };
int airlock_jail_clearenv(void) {
    if (clearenv() != 0) return -1;
    environ = airlock_empty_environment;
    return 0;
}
int airlock_jail_setgroups_none(void) { return setgroups(0, NULL); }
int airlock_jail_setresuid(uid_t uid) { return setresuid(uid, uid, uid); }
int airlock_jail_setresgid(gid_t gid) { return setresgid(gid, gid, gid); }
int airlock_jail_set_no_new_privs(void) { return prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); }
int airlock_jail_set_parent_death_kill(void) { return prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0); }
int airlock_jail_set_dumpable(int on) { return prctl(PR_SET_DUMPABLE, on ? 1 : 0, 0, 0, 0); }

int airlock_jail_lock_securebits(void) {
    return prctl(PR_SET_SECUREBITS,
                 SECBIT_NOROOT | SECBIT_NOROOT_LOCKED | SECBIT_NO_SETUID_FIXUP_LOCKED |
                 SECBIT_KEEP_CAPS_LOCKED | SECBIT_NO_CAP_AMBIENT_RAISE | SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED,
                 0, 0, 0);
}

long airlock_jail_mount_flags_of(const char *path) {
    struct statvfs info;
    if (statvfs(path, &info) != 0) return -1;
    long flags = 0;
    if (info.f_flag & ST_NOSUID) flags |= MS_NOSUID;
    if (info.f_flag & ST_NODEV) flags |= MS_NODEV;
    if (info.f_flag & ST_NOEXEC) flags |= MS_NOEXEC;
    if (info.f_flag & ST_NOATIME) flags |= MS_NOATIME;
    if (info.f_flag & ST_NODIRATIME) flags |= MS_NODIRATIME;
    if (info.f_flag & ST_RELATIME) flags |= MS_RELATIME;
    return flags;
}

int airlock_jail_pidfd_open(pid_t pid) { return (int)syscall(SYS_pidfd_open, pid, 0); }
int airlock_jail_pidfd_send_signal(int pidfd, int sig) {
    return (int)syscall(SYS_pidfd_send_signal, pidfd, sig, NULL, 0);
}
int airlock_jail_single_malloc_arena(void) { return mallopt(M_ARENA_MAX, 1) == 1 ? 0 : -1; }
int airlock_jail_pipe(int fds[2]) { return pipe2(fds, O_CLOEXEC); }

int airlock_jail_seccomp_load(const void *program, unsigned int instructions, unsigned int flags) {
    // The kernel's own limit; above it .len would silently wrap to a short prefix of the program.
    if (instructions == 0 || instructions > BPF_MAXINSNS) { errno = EINVAL; return -1; }
    struct sock_fprog prog = { .len = (unsigned short)instructions, .filter = (struct sock_filter *)program };
    return (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, flags, &prog);
}

// ---- Stage 0 -> stage 1 / stage 2 ----

static void forwarded_set(sigset_t *set) {
    sigemptyset(set);
    sigaddset(set, SIGTERM);
    sigaddset(set, SIGINT);
    sigaddset(set, SIGHUP);
    sigaddset(set, SIGQUIT);
    sigaddset(set, SIGCHLD);
}

_Static_assert(sizeof(sigset_t) <= AIRLOCK_SIGSET_BYTES, "sigset_t fits the caller's buffer");

pid_t airlock_jail_fork(void *saved_mask) {
    // Blocked before the fork so a SIGTERM that arrives before stage 1 has its
    // signalfd is queued for it rather than killing it with the default action.
    sigset_t block;
    forwarded_set(&block);
    if (sigprocmask(SIG_BLOCK, &block, (sigset_t *)saved_mask) != 0) return -1;
    pid_t pid = fork();
    if (pid < 0) {
        int saved = errno;
        sigprocmask(SIG_SETMASK, (sigset_t *)saved_mask, NULL);
        errno = saved;
    }
    return pid;
}

int airlock_jail_restore_signals(const void *saved_mask) {
    return sigprocmask(SIG_SETMASK, (const sigset_t *)saved_mask, NULL);
}

static void die_of(int sig, int fallback) {
    // Re-raise so the supervisor's waitpid sees the same signal death it would
    // see without the extra process; core dumps are off (RLIMIT_CORE is 0).
    signal(sig, SIG_DFL);
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, sig);
    sigprocmask(SIG_UNBLOCK, &set, NULL);
    raise(sig);
    _exit(fallback);
}

_Noreturn void airlock_jail_stage1(pid_t child, int lifeline, int keep, int seccomp_exit_code, int failure_exit_code) {
    // Stage 1 keeps nothing of the VMM's: its stdout/stderr copies would only
    // delay the supervisor's EOF, and it has nothing to say. It keeps the
    // lifeline and the write end of stage 2's parent-death pipe.
    int lo = lifeline < keep ? lifeline : keep;
    int hi = lifeline < keep ? keep : lifeline;
    unsigned next = 0;
    if (lo >= 0) { if ((unsigned)lo > next) airlock_jail_close_range(next, (unsigned)lo - 1); next = (unsigned)lo + 1; }
    if (hi >= 0 && hi != lo) { if ((unsigned)hi > next) airlock_jail_close_range(next, (unsigned)hi - 1); next = (unsigned)hi + 1; }
    airlock_jail_close_range(next, ~0U);
    sigset_t set;
    forwarded_set(&set);
    int sfd = signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
    if (sfd < 0) {
        kill(child, SIGKILL);
        _exit(failure_exit_code);
    }
    int received = 0;
    int lifeline_open = lifeline >= 0;
    for (;;) {
        // Reap first: SIGCHLD may have been queued before the signalfd existed.
        int status = 0;
        pid_t done = waitpid(child, &status, WNOHANG);
        if (done == child) {
            if (received) die_of(received, 128 + received);
            if (WIFEXITED(status)) _exit(WEXITSTATUS(status));
            if (WIFSIGNALED(status)) {
                int sig = WTERMSIG(status);
                // SIGSYS can only come from the kernel's seccomp kill (the
                // filter's own reporter exits with the code instead).
                if (sig == SIGSYS) _exit(seccomp_exit_code);
                die_of(sig, 128 + sig);
            }
            _exit(failure_exit_code);
        }
        if (done < 0 && errno != EINTR) _exit(failure_exit_code);

        struct pollfd fds[2] = { { .fd = sfd, .events = POLLIN }, { .fd = lifeline, .events = POLLIN } };
        int n = poll(fds, lifeline_open ? 2 : 1, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            kill(child, SIGKILL);
            _exit(failure_exit_code);
        }
        if (fds[0].revents & POLLIN) {
            struct signalfd_siginfo info;
            while (read(sfd, &info, sizeof info) == (ssize_t)sizeof info) {
                int sig = (int)info.ssi_signo;
                if (sig == SIGCHLD) continue;
                // A VMM is disposable: any request to stop it ends it now.
                // (PID 1 of a namespace ignores signals it has no handler for,
                // so forwarding SIGTERM itself would do nothing.)
                if (!received) received = sig;
                kill(child, SIGKILL);
                break;
            }
        }
        if (lifeline_open && (fds[1].revents & (POLLIN | POLLHUP | POLLERR))) {
            // The supervisor is gone (or wrote to the lifeline, which it never
            // does): nobody will collect this VM's result.
            lifeline_open = 0;
            close(lifeline);
            if (!received) received = SIGKILL;
            kill(child, SIGKILL);
        }
    }
}

int airlock_jail_pipe_hung_up(int fd) {
    struct pollfd p = { .fd = fd, .events = POLLIN };
    int n = poll(&p, 1, 0);
    if (n < 0) return -1;
    return (p.revents & (POLLHUP | POLLERR)) ? 1 : 0;
}

// ---- User namespace maps ----

static int write_file(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    size_t len = strlen(text);
    ssize_t n = write(fd, text, len);
    int saved = errno;
    close(fd);
    errno = saved;
    return n == (ssize_t)len ? 0 : -1;
}

pid_t airlock_jail_spawn_idmapper(uid_t uid, gid_t gid, int *go_fd) {
    int p[2];
    if (pipe2(p, O_CLOEXEC) != 0) return -1;
    pid_t target = getpid();
    pid_t pid = fork();
    if (pid < 0) {
        int saved = errno;
        close(p[0]);
        close(p[1]);
        errno = saved;
        return -1;
    }
    if (pid == 0) {
        close(p[1]);
        char go;
        ssize_t n;
        do { n = read(p[0], &go, 1); } while (n < 0 && errno == EINTR);
        if (n != 1) _exit(1);
        // Inside, uid/gid 0 is the jail's uid/gid outside: set-up runs as the
        // namespace's root, and the process never holds a host identity but
        // the jail's (its capabilities are dropped before Jail.enter returns).
        char path[64], map[64];
        snprintf(map, sizeof map, "0 %u 1\n", (unsigned)uid);
        snprintf(path, sizeof path, "/proc/%d/uid_map", (int)target);
        if (write_file(path, map) != 0) _exit(1);
        snprintf(map, sizeof map, "0 %u 1\n", (unsigned)gid);
        snprintf(path, sizeof path, "/proc/%d/gid_map", (int)target);
        if (write_file(path, map) != 0) _exit(1);
        _exit(0);
    }
    close(p[0]);
    *go_fd = p[1];
    return pid;
}

int airlock_jail_wait_status(pid_t pid, int *status) {
    pid_t r;
    do { r = waitpid(pid, status, 0); } while (r < 0 && errno == EINTR);
    return r < 0 ? -1 : 0;
}

// ---- Supervisor spawn ----

int airlock_jail_spawn(pid_t *pid, const char *path, char *const argv[], char *const envp[],
                       const int *parent_fds, const int *child_fds, int count) {
    posix_spawn_file_actions_t actions;
    posix_spawnattr_t attr;
    int rc = posix_spawn_file_actions_init(&actions);
    if (rc) return rc;
    rc = posix_spawnattr_init(&attr);
    if (rc) { posix_spawn_file_actions_destroy(&actions); return rc; }

    int highest = 2;
    for (int i = 0; i < count; i++) {
        if (parent_fds[i] > highest) highest = parent_fds[i];
        if (child_fds[i] > highest) highest = child_fds[i];
    }
    int highest_child = -1;
    for (int i = 0; i < count; i++) if (child_fds[i] > highest_child) highest_child = child_fds[i];
    // Two passes through fds above every number in play, so a mapping never
    // overwrites a source another mapping still needs (0<-1 and 1<-0, say).
    for (int i = 0; i < count && rc == 0; i++)
        rc = posix_spawn_file_actions_adddup2(&actions, parent_fds[i], highest + 1 + i);
    for (int i = 0; i < count && rc == 0; i++)
        rc = posix_spawn_file_actions_adddup2(&actions, highest + 1 + i, child_fds[i]);
    // Every other descriptor is closed: the gaps below the highest child fd
    // (an inherited fd 0 that the map leaves out, say) and everything above it.
    for (int fd = 0; fd < highest_child && rc == 0; fd++) {
        int mapped = 0;
        for (int i = 0; i < count; i++) if (child_fds[i] == fd) mapped = 1;
        if (!mapped) rc = posix_spawn_file_actions_addclose(&actions, fd);
    }
    if (rc == 0) rc = posix_spawn_file_actions_addclosefrom_np(&actions, highest_child + 1);

    sigset_t empty, all;
    sigemptyset(&empty);
    sigfillset(&all);
    if (rc == 0) rc = posix_spawnattr_setsigmask(&attr, &empty);
    if (rc == 0) rc = posix_spawnattr_setsigdefault(&attr, &all);
    if (rc == 0) rc = posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
    if (rc == 0) rc = posix_spawn(pid, path, &actions, &attr, argv, envp);
    posix_spawn_file_actions_destroy(&actions);
    posix_spawnattr_destroy(&attr);
    return rc;
}

// ---- Seccomp violation reporting ----

#ifndef SYS_SECCOMP
#define SYS_SECCOMP 1  // si_code of a seccomp trap (asm-generic/siginfo.h)
#endif

#define AIRLOCK_MAX_SYSCALL 512
static char syscall_names[AIRLOCK_MAX_SYSCALL][32];
static volatile int sigsys_exit_code = 159;
static __thread const char *thread_role __attribute__((tls_model("initial-exec"))) = 0;

void airlock_jail_sigsys_set_name(int nr, const char *name) {
    if (nr < 0 || nr >= AIRLOCK_MAX_SYSCALL || !name) return;
    strncpy(syscall_names[nr], name, sizeof syscall_names[nr] - 1);
}

void airlock_jail_set_thread_role(const char *role) { thread_role = role; }

// Async-signal-safe formatting: no stdio, no allocation.
static void put_str(char *buf, size_t cap, size_t *len, const char *s) {
    while (*s && *len < cap) buf[(*len)++] = *s++;
}
static void put_num(char *buf, size_t cap, size_t *len, long v) {
    char tmp[24];
    int n = 0;
    unsigned long u = v < 0 ? (unsigned long)(-v) : (unsigned long)v;
    do { tmp[n++] = (char)('0' + u % 10); u /= 10; } while (u && n < (int)sizeof tmp);
    if (v < 0 && *len < cap) buf[(*len)++] = '-';
    while (n > 0 && *len < cap) buf[(*len)++] = tmp[--n];
}

static void sigsys_handler(int sig, siginfo_t *info, void *context) {
    (void)sig;
    (void)context;
    char buf[320];
    size_t len = 0;
    const size_t cap = sizeof buf - 1;
    int code = sigsys_exit_code;
    if (info->si_code == SYS_SECCOMP) {
        int nr = info->si_syscall;
        put_str(buf, cap, &len, "airlock: sandbox violation: the seccomp filter blocked system call ");
        if (nr >= 0 && nr < AIRLOCK_MAX_SYSCALL && syscall_names[nr][0]) {
            put_str(buf, cap, &len, syscall_names[nr]);
            put_str(buf, cap, &len, " (");
            put_num(buf, cap, &len, nr);
            put_str(buf, cap, &len, ")");
        } else {
            put_num(buf, cap, &len, nr);
        }
        put_str(buf, cap, &len, " on the ");
        put_str(buf, cap, &len, thread_role ? thread_role : "unnamed");
        put_str(buf, cap, &len, " thread ");
        put_num(buf, cap, &len, (long)syscall(SYS_gettid));
    } else {
        put_str(buf, cap, &len, "airlock: sandbox violation: SIGSYS sent by pid ");
        put_num(buf, cap, &len, (long)info->si_pid);
    }
    put_str(buf, cap, &len, "; the VMM exits with status ");
    put_num(buf, cap, &len, code);
    buf[len++] = '\n';
    syscall(SYS_write, 2, buf, len);
    syscall(SYS_exit_group, code);
    for (;;) {}
}

int airlock_jail_install_sigsys_reporter(int exit_code) {
    sigsys_exit_code = exit_code;
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = sigsys_handler;
    action.sa_flags = SA_SIGINFO;
    // Nothing may interrupt the report: it is the last thing the process does.
    sigfillset(&action.sa_mask);
    if (sigaction(SIGSYS, &action, NULL) != 0) return -1;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGSYS);
    return sigprocmask(SIG_UNBLOCK, &set, NULL);
}

// ---- Probe hooks ----

long airlock_jail_probe_execve(void) {
    char *const argv[] = { "/bin/true", NULL };
    char *const envp[] = { NULL };
    long r = syscall(SYS_execve, "/bin/true", argv, envp);
    return r < 0 ? -errno : r;
}

long airlock_jail_probe_socket_inet(void) {
    long r = syscall(SYS_socket, AF_INET, SOCK_STREAM, 0);
    return r < 0 ? -errno : r;
}

long airlock_jail_probe_open(const char *path) {
    long r = syscall(SYS_openat, AT_FDCWD, path, O_RDONLY | O_CLOEXEC);
    return r < 0 ? -errno : r;
}

long airlock_jail_probe_ioctl(int fd, unsigned long request) {
    long r = syscall(SYS_ioctl, fd, request, 0);
    return r < 0 ? -errno : r;
}

long airlock_jail_probe_mmap_exec(void) {
    long r = syscall(SYS_mmap, NULL, 4096, PROT_READ | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return r < 0 ? -errno : r;
}

long airlock_jail_probe_fork(void) {
    long r = syscall(SYS_clone, SIGCHLD, 0, NULL, NULL, 0);
    return r < 0 ? -errno : r;
}
