// A Swift program that does nothing but wait, linked the way `airlock` is
// (the Swift runtime static, glibc and libstdc++ shared). `make bench` measures
// its memory beside the VMM's: the floor under any Swift VMM on this host.
#if canImport(Glibc)
import Glibc
#endif

print("floor ready")
fflush(stdout)
sleep(60)
