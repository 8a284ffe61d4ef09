// segv: a user-mode fault. Writes through a null pointer, so the process dies of SIGSEGV
// (exit status 139 through a shell, signal 11 in the run's result) and the kernel must live on.
// Built by the tests with gcc -O2 -static -nostdlib; no libc.
void _start(void) {
    *(volatile int *)0 = 1;
    for (;;) { }
}
