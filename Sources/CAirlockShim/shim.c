#include "CAirlockShim.h"
#include <string.h>

static void airlock_kick_handler(int signo) { (void)signo; }

int airlock_install_kick_handler(int signo) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = airlock_kick_handler;
    sigemptyset(&action.sa_mask);
    return sigaction(signo, &action, NULL);
}

#include <errno.h>
#include <sys/socket.h>

ssize_t airlock_send_with_fds(int socket, const void *bytes, size_t count, const int *fds, int nfds) {
    struct iovec iov = { .iov_base = (void *)bytes, .iov_len = count };
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    char control[CMSG_SPACE(sizeof(int) * AIRLOCK_MAX_PASSED_FDS)];
    if (nfds > 0) {
        if (nfds > AIRLOCK_MAX_PASSED_FDS) { errno = EINVAL; return -1; }
        memset(control, 0, sizeof control);
        msg.msg_control = control;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
    }
    return sendmsg(socket, &msg, MSG_NOSIGNAL);
}

ssize_t airlock_receive_with_fds(int socket, void *bytes, size_t count, int *fds, int *nfds, int *truncated) {
    struct iovec iov = { .iov_base = bytes, .iov_len = count };
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    char control[CMSG_SPACE(sizeof(int) * AIRLOCK_MAX_PASSED_FDS)];
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    *nfds = 0;
    *truncated = 0;
    ssize_t n = recvmsg(socket, &msg, MSG_CMSG_CLOEXEC);
    if (n < 0) return n;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        for (int i = 0; i < k; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
            if (*nfds < AIRLOCK_MAX_PASSED_FDS) fds[(*nfds)++] = fd; else { close(fd); *truncated = 1; }
        }
    }
    if (msg.msg_flags & MSG_CTRUNC) *truncated = 1;
    return n;
}
