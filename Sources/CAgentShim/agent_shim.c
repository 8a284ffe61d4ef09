#define _GNU_SOURCE
#include "agent_shim.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/wait.h>
#include <string.h>
#include <unistd.h>

pid_t airlock_spawn(const struct airlock_spawn_spec *spec, int *stage, int *error) {
    // Written by the child, read by the parent after the child has exec'd or
    // exited: vfork shares memory and suspends the parent until then, so there
    // is no race. volatile keeps the compiler from caching them across vfork.
    volatile int failed_stage = AIRLOCK_SPAWN_OK;
    volatile int failed_errno = 0;

    pid_t pid = vfork();
    if (pid < 0) {
        *stage = AIRLOCK_SPAWN_FORK;
        *error = errno;
        return -1;
    }
    if (pid == 0) {
        // The agent ignores SIGPIPE and blocks SIGCHLD for its own loop; the
        // command must start with the defaults. (A vfork child has its own
        // signal table: changing it does not touch the agent's.)
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        for (int s = 1; s < NSIG; s++) signal(s, SIG_DFL);
        setsid();

        if (dup2(spec->stdin_fd, 0) < 0 || dup2(spec->stdout_fd, 1) < 0 || dup2(spec->stderr_fd, 2) < 0) {
            failed_stage = AIRLOCK_SPAWN_FDS;
            goto fail;
        }
        if (spec->set_ids) {
            if (setgroups(spec->group_count, spec->groups) < 0) { failed_stage = AIRLOCK_SPAWN_GROUPS; goto fail; }
            if (setgid(spec->gid) < 0) { failed_stage = AIRLOCK_SPAWN_GID; goto fail; }
            if (setuid(spec->uid) < 0) { failed_stage = AIRLOCK_SPAWN_UID; goto fail; }
        }
        // After the ids, so the directory is entered with the command's own permissions.
        if (chdir(spec->cwd) < 0) { failed_stage = AIRLOCK_SPAWN_CHDIR; goto fail; }
        execve(spec->path, spec->argv, spec->envp);
        failed_stage = AIRLOCK_SPAWN_EXEC;
    fail:
        failed_errno = errno;
        _exit(127);
    }
    if (failed_stage != AIRLOCK_SPAWN_OK) {
        // The child has _exit'ed: collect it so it is not reported as the command's end.
        int status;
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
        *stage = failed_stage;
        *error = failed_errno;
        return -1;
    }
    *stage = AIRLOCK_SPAWN_OK;
    *error = 0;
    return pid;
}

int airlock_pipe_cloexec(int fds[2]) { return pipe2(fds, O_CLOEXEC); }

// Swift's static runtime reads /proc/self/exe while it initialises, before
// main, and aborts when /proc is not mounted, which is how the kernel starts
// PID 1. This constructor runs first (priority 101 precedes the runtime's
// default-priority initialisers) and mounts /proc for it; the agent's own
// mount table later finds it mounted (EBUSY) and goes on. Only as PID 1: a
// test process that links this library must not mount anything.
__attribute__((constructor(101))) static void airlock_mount_proc_early(void) {
    if (getpid() == 1 && access("/proc/self/exe", F_OK) != 0) {
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    }
}

#include <linux/random.h>
#include <sys/ioctl.h>

int airlock_add_entropy(const void *bytes, size_t length) {
    if (length > 4096) return EINVAL;
    int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
    if (fd < 0) return errno;
    // struct rand_pool_info ends in a flexible array: room for it on the stack.
    union { struct rand_pool_info info; unsigned char room[sizeof(struct rand_pool_info) + 4096]; } pool;
    pool.info.entropy_count = (int)(length * 8);
    pool.info.buf_size = (int)length;
    memcpy(pool.info.buf, bytes, length);
    int rc = 0;
    if (ioctl(fd, RNDADDENTROPY, &pool.info) != 0) rc = errno;
    else if (ioctl(fd, RNDRESEEDCRNG) != 0) rc = errno;
    close(fd);
    return rc;
}
