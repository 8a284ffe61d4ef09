// libcap, from Debian's libcap-dev.
#include <sys/capability.h>
