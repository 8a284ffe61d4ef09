/* The C floor for one port-I/O exit: ../shared/kvm-probes/micro.c's own
 * setup() and runcode() (included with its main renamed away), running only its
 * "100k out" case, so the benchmark skips micro.c's 170 s CPL0 loop on PVM hosts.
 * Usage: exit-floor [ROUNDS] -- prints one micro.c line per round. */
#define main micro_main
#include MICRO_C
#undef main

int main(int argc, char **argv) {
    int rounds = argc > 1 ? atoi(argv[1]) : 1;
    setup();
    /* The same bytes as micro.c: mov rcx,100000; L: out 0x80,al; dec rcx; jnz L; hlt */
    uint8_t outs[] = {0x48,0xb9,0xa0,0x86,0x01,0,0,0,0,0, 0xe6,0x80, 0x48,0xff,0xc9, 0x75,0xf9, 0xf4};
    for (int i = 0; i < rounds; i++) runcode(outs, sizeof outs, "100k out (user exits)");
    return 0;
}
