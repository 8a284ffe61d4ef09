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
