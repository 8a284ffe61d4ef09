// The guest agent's process start: vfork + exec with the credentials, working
// directory and descriptors a run asks for. In C because the child between
// vfork and exec may only make system calls: Swift code there could allocate
// or take locks that the suspended parent holds.
#ifndef AIRLOCK_AGENT_SHIM_H
#define AIRLOCK_AGENT_SHIM_H

#include <sys/types.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <stddef.h>

// pipe2 needs _GNU_SOURCE, which a module header cannot set for its importers.
int airlock_pipe_cloexec(int fds[2]);

// Which step of the child's set-up failed (reported with its errno).
enum airlock_spawn_stage {
    AIRLOCK_SPAWN_OK = 0,
    AIRLOCK_SPAWN_FORK = 1,
    AIRLOCK_SPAWN_FDS = 2,
    AIRLOCK_SPAWN_GROUPS = 3,
    AIRLOCK_SPAWN_GID = 4,
    AIRLOCK_SPAWN_UID = 5,
    AIRLOCK_SPAWN_CHDIR = 6,
    AIRLOCK_SPAWN_EXEC = 7,
};

struct airlock_spawn_spec {
    const char *path;          // the executable, already resolved against PATH
    char *const *argv;         // NULL-terminated
    char *const *envp;         // NULL-terminated
    const char *cwd;
    int set_ids;               // nonzero: set groups, gid and uid below
    uid_t uid;
    gid_t gid;
    const gid_t *groups;
    size_t group_count;
    int stdin_fd, stdout_fd, stderr_fd;   // become 0, 1 and 2
};

// Starts the command in a new session (its pid is its process group). Returns
// the pid, or -1 with *stage and *error saying which step failed and why.
pid_t airlock_spawn(const struct airlock_spawn_spec *spec, int *stage, int *error);

// Mixes `length` bytes into the kernel's random pool, credited as full
// entropy (RNDADDENTROPY on /dev/urandom), then makes the kernel's CRNG reseed
// from the pool at once (RNDRESEEDCRNG). Both need CAP_SYS_ADMIN (PID 1 has it).
// Returns 0, or the errno of the step that failed.
int airlock_add_entropy(const void *bytes, size_t length);

#endif
