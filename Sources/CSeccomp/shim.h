// libseccomp, from Debian's libseccomp-dev.
#include <seccomp.h>
