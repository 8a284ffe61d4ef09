// The parts of the jail Swift cannot do safely or at all: calls glibc hides
// behind _GNU_SOURCE or makes variadic (prctl, mount flags), raw syscalls with
// no glibc wrapper (pivot_root, close_range, pidfd_*, seccomp), the fork into
// stage 1 and its wait loop, and the async-signal-safe SIGSYS reporter.
//
// Every function returns -1 with errno set on failure, like the syscall it
// wraps, so the Swift side can run it through one EINTR-aware helper.
#ifndef AIRLOCK_JAIL_SHIM_H
#define AIRLOCK_JAIL_SHIM_H

#include <stdint.h>
#include <sys/types.h>

// Namespace flags (sched.h needs _GNU_SOURCE for these).
extern const int AIRLOCK_CLONE_NEWNS;
extern const int AIRLOCK_CLONE_NEWPID;
extern const int AIRLOCK_CLONE_NEWIPC;
extern const int AIRLOCK_CLONE_NEWUTS;
extern const int AIRLOCK_CLONE_NEWNET;
extern const int AIRLOCK_CLONE_NEWUSER;
extern const int AIRLOCK_CLONE_NEWCGROUP;
extern const int AIRLOCK_CLONE_THREAD;

// Mount flags (sys/mount.h).
extern const unsigned long AIRLOCK_MS_RDONLY;
extern const unsigned long AIRLOCK_MS_NOSUID;
extern const unsigned long AIRLOCK_MS_NODEV;
extern const unsigned long AIRLOCK_MS_NOEXEC;
extern const unsigned long AIRLOCK_MS_BIND;
extern const unsigned long AIRLOCK_MS_REC;
extern const unsigned long AIRLOCK_MS_PRIVATE;
extern const unsigned long AIRLOCK_MS_REMOUNT;
extern const int AIRLOCK_MNT_DETACH;

// seccomp(2) and prctl(2) constants.
extern const unsigned int AIRLOCK_SECCOMP_SET_MODE_FILTER;
extern const unsigned int AIRLOCK_SECCOMP_FILTER_FLAG_TSYNC;

int airlock_jail_unshare(int flags);
int airlock_jail_mount(const char *source, const char *target, const char *fstype,
                       unsigned long flags, const char *data);
int airlock_jail_umount2(const char *target, int flags);
int airlock_jail_pivot_root(const char *new_root, const char *put_old);
int airlock_jail_mknod_char(const char *path, unsigned int mode, unsigned int major, unsigned int minor);
int airlock_jail_sethostname(const char *name);
int airlock_jail_close_range(unsigned int first, unsigned int last);
int airlock_jail_clearenv(void);
int airlock_jail_setgroups_none(void);
int airlock_jail_setresuid(uid_t uid);
int airlock_jail_setresgid(gid_t gid);
int airlock_jail_set_no_new_privs(void);
int airlock_jail_set_parent_death_kill(void);
int airlock_jail_set_dumpable(int on);
/// The per-mount flags (nosuid, nodev, noexec, atime) of the mount holding
/// `path`, as MS_ bits: a read-only remount of a bind mount must repeat them,
/// or the kernel refuses it inside a user namespace (they are locked there).
long airlock_jail_mount_flags_of(const char *path);
/// Secure bits that keep a dropped process from regaining capabilities as
/// root (NOROOT) and lock the setuid fix-ups on.
int airlock_jail_lock_securebits(void);

int airlock_jail_pidfd_open(pid_t pid);
int airlock_jail_pidfd_send_signal(int pidfd, int sig);
/// pipe2(fds, O_CLOEXEC).
int airlock_jail_pipe(int fds[2]);
/// mallopt(M_ARENA_MAX, 1): every thread allocates from the main arena. 0, or -1.
int airlock_jail_single_malloc_arena(void);
int airlock_jail_seccomp_load(const void *program, unsigned int instructions, unsigned int flags);

/// Stage 0 -> 1/2. Blocks the forwarded signals (TERM, INT, HUP, QUIT) and
/// SIGCHLD, then forks. Returns the child's pid in the parent, 0 in the child,
/// -1 on failure (signals restored). `saved_mask` receives the previous mask
/// for `airlock_jail_restore_signals` in the child.
pid_t airlock_jail_fork(void *saved_mask /* sigset_t, 128 bytes */);
int airlock_jail_restore_signals(const void *saved_mask);
enum { AIRLOCK_SIGSET_BYTES = 128 };

/// Stage 1: closes every fd but `lifeline` and `keep` (-1 for none), waits for `child`
/// and leaves with its status, never returns. Forwarded signals end the child
/// with SIGKILL and stage 1 then dies of the signal it received; the lifeline
/// reading EOF (the supervisor is gone) ends the child too. A child killed by
/// SIGSYS (the kernel's seccomp kill) becomes `seccomp_exit_code`.
_Noreturn void airlock_jail_stage1(pid_t child, int lifeline, int keep, int seccomp_exit_code, int failure_exit_code);

/// Stage 2 parent-death check: 1 when the write end of the pipe whose read
/// end is `fd` has been closed everywhere (stage 1 is gone), 0 otherwise.
int airlock_jail_pipe_hung_up(int fd);

/// User-namespace mapping helper, run in stage 0 before unshare(CLONE_NEWUSER):
/// forks a helper that waits for a byte on a pipe, writes
/// /proc/<parent>/{uid_map,gid_map} mapping namespace uid/gid 0 to `uid`/`gid`
/// outside, and exits 0 (1 on failure). Returns the helper pid and the
/// pipe's write end in `*go_fd`.
pid_t airlock_jail_spawn_idmapper(uid_t uid, gid_t gid, int *go_fd);
/// Waits for a child and returns its raw wait status (EINTR retried).
int airlock_jail_wait_status(pid_t pid, int *status);

/// Supervisor: posix_spawn with `count` fds placed at `child_fds[i]` from
/// `parent_fds[i]`, every other fd closed, default signal dispositions and an
/// empty signal mask. Returns 0 or an errno value.
int airlock_jail_spawn(pid_t *pid, const char *path, char *const argv[], char *const envp[],
                       const int *parent_fds, const int *child_fds, int count);

/// Seccomp violation reporting. `set_name` records a syscall's name for the
/// report (before any filter is loaded: the handler cannot allocate).
void airlock_jail_sigsys_set_name(int nr, const char *name);
/// Installs the SIGSYS handler: it writes one line naming the syscall, its
/// number, the thread's role and id to fd 2, and exits the process with
/// `exit_code`. Returns 0 or -1 (errno).
int airlock_jail_install_sigsys_reporter(int exit_code);
/// The calling thread's role, for the report ("main", "vcpu"). `role` must be
/// a string literal or otherwise outlive the thread.
void airlock_jail_set_thread_role(const char *role);

/// Test hooks for airlock-jail-probe: each makes one system call the filters
/// forbid; they return only if the call was allowed (the result, or -errno).
long airlock_jail_probe_execve(void);
long airlock_jail_probe_socket_inet(void);
long airlock_jail_probe_open(const char *path);
long airlock_jail_probe_ioctl(int fd, unsigned long request);
long airlock_jail_probe_mmap_exec(void);
/// clone(SIGCHLD): a fork. Returns 0 in a child, should one be made.
long airlock_jail_probe_fork(void);

#endif
