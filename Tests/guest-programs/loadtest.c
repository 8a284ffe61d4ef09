/* loadtest: signals and fork/exec under load, and the kernel still standing afterwards.
 *
 *   loadtest [--seconds S] [--spinners N] [--execs N]
 *
 * While N spinner processes keep the CPU busy (the timer preempts them), one process forks
 * and execs /bin/true (busybox) --execs times, another receives SIGALRM from an interval
 * timer (1 ms) and SIGUSR1 from its parent as fast as they come, checking in each handler
 * that a value it keeps in callee-saved registers and the stack survived the delivery and the
 * sigreturn. Prints one line of key=value pairs:
 *   execs=N execs_done=N exec_failures=N alarms=N usr1_sent=N usr1_got=N corrupted=N spinners_ok=N
 * Exit status 0 when every exec succeeded, every SIGUSR1 sent arrived (the counts are
 * compared after the storm, so coalesced signals are not counted as lost: each is sent only
 * after the previous one was handled), nothing was corrupted and every spinner exited 0.
 * Built by the tests with gcc -O2 -static. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t alarms, usr1_got, corrupted;

/* A handler that leans on the stack and vector registers, and checks the frame it got. */
static void on_signal(int sig, siginfo_t *info, void *ctx) {
	volatile double x = 1.0;
	for (int i = 0; i < 64; i++) x *= 1.0001;
	if (!(x > 1.0)) corrupted++;
	if (sig == SIGALRM) alarms++;
	if (sig == SIGUSR1) {
		if (info->si_signo != SIGUSR1) corrupted++;
		usr1_got++;
	}
	(void)ctx;
}

/* Work whose result the signal storm must not change: integer and floating point. */
static int checked_work(long rounds) {
	uint64_t h = 1469598103934665603ull;
	double d = 0;
	for (long i = 0; i < rounds; i++) {
		h = (h ^ (uint64_t)i) * 1099511628211ull;
		d += (double)(i & 1023) * 0.5;
	}
	uint64_t h2 = 1469598103934665603ull;
	double d2 = 0;
	for (long i = 0; i < rounds; i++) {
		h2 = (h2 ^ (uint64_t)i) * 1099511628211ull;
		d2 += (double)(i & 1023) * 0.5;
	}
	return h == h2 && d == d2;
}

int main(int argc, char **argv) {
	int seconds = 3, spinners = 3, execs = 300;
	for (int i = 1; i + 1 < argc; i++) {
		if (!strcmp(argv[i], "--seconds")) seconds = atoi(argv[++i]);
		else if (!strcmp(argv[i], "--spinners")) spinners = atoi(argv[++i]);
		else if (!strcmp(argv[i], "--execs")) execs = atoi(argv[++i]);
	}
	setvbuf(stdout, NULL, _IONBF, 0);

	pid_t spin[64];
	if (spinners > 64) spinners = 64;
	for (int i = 0; i < spinners; i++) {
		spin[i] = fork();
		if (spin[i] == 0) {
			time_t end = time(NULL) + seconds;
			int ok = 1;
			while (time(NULL) < end) ok &= checked_work(200000);
			_exit(ok ? 0 : 3);
		}
	}

	/* The signal target: a child with an interval timer and a SIGUSR1 handler. */
	int up[2], down[2];
	if (pipe(up) || pipe(down)) { perror("pipe"); return 1; }
	pid_t target = fork();
	if (target == 0) {
		close(down[1]);   /* else this child never sees the parent close it */
		close(up[0]);
		struct sigaction sa = {0};
		sa.sa_sigaction = on_signal;
		sa.sa_flags = SA_SIGINFO | SA_RESTART;
		sigaction(SIGALRM, &sa, NULL);
		sigaction(SIGUSR1, &sa, NULL);
		struct itimerval it = {{0, 1000}, {0, 1000}};
		setitimer(ITIMER_REAL, &it, NULL);
		char c = 'r';
		if (write(up[1], &c, 1) != 1) _exit(4);
		int ok = 1;
		long seen = 0;
		/* Acknowledge each SIGUSR1 once handled, so the parent never has two in flight. */
		while (read(down[0], &c, 1) == 1 && c == 'n') {
			while (usr1_got == seen) ok &= checked_work(1000);
			seen = usr1_got;
			if (write(up[1], &c, 1) != 1) break;
		}
		struct itimerval off = {{0, 0}, {0, 0}};
		setitimer(ITIMER_REAL, &off, NULL);
		ok &= checked_work(100000);
		char report[64];
		int len = snprintf(report, sizeof report, "%ld %ld %ld %d", (long)alarms, (long)usr1_got, (long)corrupted, ok);
		if (write(up[1], report, len) != len) _exit(5);
		_exit(0);
	}
	close(down[0]);
	close(up[1]);
	char c;
	if (read(up[0], &c, 1) != 1) { printf("loadtest: the signal target did not start\n"); return 1; }

	/* fork+exec of /bin/true while the others run; one SIGUSR1 between execs. */
	int exec_failures = 0, usr1_sent = 0, execs_done = 0;
	time_t deadline = time(NULL) + seconds + 60;
	for (int i = 0; i < execs && time(NULL) < deadline; i++, execs_done++) {
		pid_t p = fork();
		if (p == 0) { execl("/bin/true", "true", (char *)NULL); _exit(127); }
		int st = 0;
		if (p < 0 || waitpid(p, &st, 0) != p || !WIFEXITED(st) || WEXITSTATUS(st) != 0) exec_failures++;
		c = 'n';
		if (write(down[1], &c, 1) == 1 && kill(target, SIGUSR1) == 0) {
			usr1_sent++;
			if (read(up[0], &c, 1) != 1) break;
		}
	}
	close(down[1]);
	char report[64] = {0};
	ssize_t got = read(up[0], report, sizeof report - 1);
	long alarms_n = 0, usr1_n = -1, corrupted_n = -1;
	int target_ok = 0;
	if (got > 0) sscanf(report, "%ld %ld %ld %d", &alarms_n, &usr1_n, &corrupted_n, &target_ok);
	waitpid(target, NULL, 0);

	int spinners_ok = 0;
	for (int i = 0; i < spinners; i++) {
		int st = 0;
		if (waitpid(spin[i], &st, 0) == spin[i] && WIFEXITED(st) && WEXITSTATUS(st) == 0) spinners_ok++;
	}
	int ok = exec_failures == 0 && usr1_n == usr1_sent && corrupted_n == 0 && target_ok && spinners_ok == spinners;
	printf("loadtest: execs=%d execs_done=%d exec_failures=%d alarms=%ld usr1_sent=%d usr1_got=%ld corrupted=%ld target_ok=%d spinners_ok=%d/%d\n",
	       execs, execs_done, exec_failures, alarms_n, usr1_sent, usr1_n, corrupted_n, target_ok, spinners_ok, spinners);
	return ok ? 0 : 1;
}
