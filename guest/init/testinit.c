// cellvm test init: PID 1 of the guest-kernel boot tests.
//
// Checks what a sandbox guest needs from the kernel, prints exactly one
// result line on the console and powers the machine off:
//
//   CELLVM-TESTINIT: PASS {"cpus":2,"getppid_ns":312.4,...}
//   CELLVM-TESTINIT: FAIL <check>: <what happened>
//
// Command line parameters (read from /proc/cmdline):
//   cellvm.cpus=N       number of CPUs that must be online (default 1)
//   cellvm.mode=sh      run busybox `sh -c "$cellvm.sh"` instead of the checks;
//                       the script comes from cellvm.sh=... (with '+' for ' ')
//   cellvm.kaddrs=A,B   extra kernel addresses (hex) for the isolation probes
//   cellvm.quick=1      smaller loops (for slow emulation, e.g. TCG)
//
// `init bench` runs only the timing loops and prints their JSON: the same
// figures on the host, for guest/host ratios.
//
// Every check runs under an alarm, so a hang becomes a FAIL line, not a hung VM.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "testinit.h"

static char json[4096];
static size_t json_len;
static char cmdline[4096];
static int quick;

static void power_off(void)
{
	sync();
	reboot(RB_POWER_OFF);
	// Only reached if the kernel refuses; the VMM's deadline ends the VM.
	for (;;)
		pause();
}

static void emit(const char *line)
{
	// One write() so the line is never interleaved with kernel messages.
	size_t n = strlen(line);
	while (n > 0) {
		ssize_t w = write(1, line, n);
		if (w <= 0)
			break;
		line += w;
		n -= (size_t)w;
	}
}

void fail(const char *check, const char *fmt, ...)
{
	char line[1024];
	int n = snprintf(line, sizeof line, "\nCELLVM-TESTINIT: FAIL %s: ", check);
	va_list ap;
	va_start(ap, fmt);
	n += vsnprintf(line + n, sizeof line - (size_t)n - 2, fmt, ap);
	va_end(ap);
	snprintf(line + n, sizeof line - (size_t)n, "\n");
	emit(line);
	if (getpid() == 1)
		power_off();
	_exit(1);
}

void result(const char *key, const char *fmt, ...)
{
	va_list ap;
	json_len += (size_t)snprintf(json + json_len, sizeof json - json_len, "%s\"%s\":",
				     json_len ? "," : "", key);
	va_start(ap, fmt);
	json_len += (size_t)vsnprintf(json + json_len, sizeof json - json_len, fmt, ap);
	va_end(ap);
}

double now_ns(clockid_t clk)
{
	struct timespec ts;
	if (clock_gettime(clk, &ts))
		fail("clock", "clock_gettime(%d): %s", (int)clk, strerror(errno));
	return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

const char *param(const char *name)
{
	size_t len = strlen(name);
	for (const char *p = cmdline; (p = strstr(p, name)) != NULL; p += len) {
		if ((p == cmdline || p[-1] == ' ') && p[len] == '=')
			return p + len + 1;
	}
	return NULL;
}

static long param_long(const char *name, long dflt)
{
	const char *v = param(name);
	return v ? strtol(v, NULL, 0) : dflt;
}

int loops(int full)
{
	return quick ? (full / 50 > 0 ? full / 50 : 1) : full;
}

// --- checks ---------------------------------------------------------------

static void check_console(void)
{
	// The kernel opened /dev/console as fds 0-2 for us.
	if (write(1, "CELLVM-TESTINIT: start\n", 23) != 23)
		fail("console", "write to fd 1: %s", strerror(errno));
}

static void check_mounts(void)
{
	mkdir("/proc", 0755);
	mkdir("/sys", 0755);
	mkdir("/tmp", 01777);
	if (mount("proc", "/proc", "proc", 0, NULL))
		fail("mounts", "mount /proc: %s", strerror(errno));
	if (mount("sysfs", "/sys", "sysfs", 0, NULL))
		fail("mounts", "mount /sys: %s", strerror(errno));
	if (mount("tmpfs", "/tmp", "tmpfs", 0, NULL))
		fail("mounts", "mount /tmp: %s", strerror(errno));
	if (access("/proc/self/stat", R_OK) || access("/sys/kernel", R_OK))
		fail("mounts", "/proc or /sys not populated");
	int fd = open("/proc/cmdline", O_RDONLY);
	ssize_t n = fd >= 0 ? read(fd, cmdline, sizeof cmdline - 1) : -1;
	if (n <= 0)
		fail("mounts", "read /proc/cmdline");
	cmdline[n] = 0;
	if (n > 0 && cmdline[n - 1] == '\n')
		cmdline[n - 1] = 0;
	close(fd);
}

static void check_ids(void)
{
	if (getpid() != 1)
		fail("getpid", "getpid() = %d, want 1", getpid());
	if (getppid() != 0)
		fail("getppid", "getppid() = %d, want 0", getppid());
}

static void check_exec(const char *self)
{
	pid_t pid = fork();
	if (pid < 0)
		fail("fork", "%s", strerror(errno));
	if (pid == 0) {
		char *argv[] = {(char *)self, "exec-child", NULL};
		char *envp[] = {"CELLVM_CHILD=1", NULL};
		execve(self, argv, envp);
		_exit(127);
	}
	int status;
	if (waitpid(pid, &status, 0) != pid)
		fail("wait", "%s", strerror(errno));
	if (!WIFEXITED(status) || WEXITSTATUS(status) != 42)
		fail("execve", "child status 0x%x, want exit 42", status);
}

static void check_clocks(void)
{
	double m0 = now_ns(CLOCK_MONOTONIC), r0 = now_ns(CLOCK_REALTIME);
	struct timespec ts = {0, 2000000};
	nanosleep(&ts, NULL);
	double m1 = now_ns(CLOCK_MONOTONIC), r1 = now_ns(CLOCK_REALTIME);
	if (m1 - m0 < 1.5e6)
		fail("clock", "monotonic advanced %.0f ns over a 2 ms sleep", m1 - m0);
	if (r1 <= r0)
		fail("clock", "realtime did not advance");
	result("realtime_s", "%.0f", r1 / 1e9);
}

static void check_memory(void)
{
	const size_t size = 64 << 20, page = 4096;
	char *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		fail("mmap", "64 MiB: %s", strerror(errno));
	double t0 = now_ns(CLOCK_MONOTONIC);
	for (size_t off = 0; off < size; off += page)
		p[off] = (char)(off / page);
	double t1 = now_ns(CLOCK_MONOTONIC);
	for (size_t off = 0; off < size; off += page)
		if (p[off] != (char)(off / page))
			fail("mmap", "page %zu lost its contents", off / page);
	if (munmap(p, size))
		fail("munmap", "%s", strerror(errno));
	result("page_fault_ns", "%.0f", (t1 - t0) / (double)(size / page));
}

static volatile sig_atomic_t got_signal;
static void flag_handler(int sig)
{
	got_signal = sig;
}

static void check_signal(void)
{
	struct sigaction sa = {.sa_handler = flag_handler};
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGUSR1, &sa, NULL))
		fail("signal", "sigaction: %s", strerror(errno));
	kill(getpid(), SIGUSR1);
	if (got_signal != SIGUSR1)
		fail("signal", "SIGUSR1 was not delivered to the handler");
}

// Two threads hand a token back and forth with FUTEX_WAIT / FUTEX_WAKE.
static _Atomic int token;
static void *futex_peer(void *arg)
{
	int rounds = *(int *)arg;
	for (int i = 0; i < rounds; i++) {
		while (token != 1)
			syscall(SYS_futex, &token, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0);
		token = 0;
		syscall(SYS_futex, &token, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
	}
	return NULL;
}

static void check_futex(void)
{
	int rounds = loops(2000);
	pthread_t t;
	if (pthread_create(&t, NULL, futex_peer, &rounds))
		fail("futex", "pthread_create failed");
	for (int i = 0; i < rounds; i++) {
		token = 1;
		syscall(SYS_futex, &token, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
		while (token != 0)
			syscall(SYS_futex, &token, FUTEX_WAIT_PRIVATE, 1, NULL, NULL, 0);
	}
	pthread_join(t, NULL);
}

struct cpu_probe {
	int cpu;
	int seen;
};
static void *on_cpu(void *arg)
{
	struct cpu_probe *c = arg;
	cpu_set_t set;
	CPU_ZERO(&set);
	CPU_SET(c->cpu, &set);
	if (sched_setaffinity(0, sizeof set, &set) == 0)
		c->seen = sched_getcpu();
	else
		c->seen = -1;
	return NULL;
}

static void check_cpus(void)
{
	long want = param_long("cellvm.cpus", 1);
	long online = sysconf(_SC_NPROCESSORS_ONLN);
	if (online != want)
		fail("cpus", "%ld CPUs online, want %ld", online, want);
	for (int cpu = 0; cpu < want; cpu++) {
		struct cpu_probe c = {cpu, -2};
		pthread_t t;
		if (pthread_create(&t, NULL, on_cpu, &c) || pthread_join(t, NULL))
			fail("cpus", "thread for CPU %d", cpu);
		if (c.seen != cpu)
			fail("cpus", "thread pinned to CPU %d ran on %d", cpu, c.seen);
	}
	result("cpus", "%ld", online);
}

// --- timings ----------------------------------------------------------------

static void time_getppid(void)
{
	int n = loops(200000);
	double t0 = now_ns(CLOCK_MONOTONIC);
	for (int i = 0; i < n; i++)
		syscall(SYS_getppid);
	result("getppid_ns", "%.1f", (now_ns(CLOCK_MONOTONIC) - t0) / n);
}

static void time_fork(void)
{
	int n = loops(500);
	double t0 = now_ns(CLOCK_MONOTONIC);
	for (int i = 0; i < n; i++) {
		pid_t pid = fork();
		if (pid == 0)
			_exit(0);
		if (pid < 0 || waitpid(pid, NULL, 0) != pid)
			fail("fork", "fork+exit loop at %d: %s", i, strerror(errno));
	}
	result("fork_exit_us", "%.1f", (now_ns(CLOCK_MONOTONIC) - t0) / n / 1e3);
}

static void time_compute(void)
{
	// A dependent integer chain: pure user-mode work, no memory traffic.
	uint64_t x = 88172645463325252ull;
	long n = quick ? 1000000 : 50000000;
	double t0 = now_ns(CLOCK_MONOTONIC);
	for (long i = 0; i < n; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
	}
	double dt = now_ns(CLOCK_MONOTONIC) - t0;
	__asm__ volatile("" ::"r"(x));
	result("compute_ms", "%.2f", dt / 1e6 * (50000000.0 / (double)n));
}

// --- modes -------------------------------------------------------------------

static void run_shell(void)
{
	// cellvm.sh=<script>, '+' stands for a space (the command line splits on spaces).
	const char *v = param("cellvm.sh");
	if (!v)
		fail("sh", "cellvm.mode=sh needs cellvm.sh=<script>");
	char script[1024];
	size_t i = 0;
	for (; v[i] && v[i] != ' ' && i < sizeof script - 1; i++)
		script[i] = v[i] == '+' ? ' ' : v[i];
	script[i] = 0;
	pid_t pid = fork();
	if (pid == 0) {
		char *argv[] = {"sh", "-c", script, NULL};
		char *envp[] = {"PATH=/bin", NULL};
		execve("/bin/busybox", argv, envp);
		_exit(127);
	}
	int status;
	if (pid < 0 || waitpid(pid, &status, 0) != pid)
		fail("sh", "fork/wait: %s", strerror(errno));
	if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
		fail("sh", "busybox sh exited with status 0x%x", status);
	result("sh", "\"ok\"");
}

int main(int argc, char **argv)
{
	if (argc > 1 && strcmp(argv[1], "exec-child") == 0)
		return getenv("CELLVM_CHILD") ? 42 : 1;
	if (argc > 1 && strcmp(argv[1], "bench") == 0) {
		// The timing loops alone, for the same figures on the host.
		check_memory();
		time_getppid();
		time_fork();
		time_compute();
		printf("{%s}\n", json);
		return 0;
	}

	// Kernel time to here: the clocks start early in the kernel's boot.
	double booted_ns = now_ns(CLOCK_BOOTTIME);
	alarm(120);
	check_console();
	check_mounts();
	result("kernel_boot_ms", "%.1f", booted_ns / 1e6);
	quick = param_long("cellvm.quick", 0) != 0;

	const char *mode = param("cellvm.mode");
	if (mode && strncmp(mode, "sh", 2) == 0 && (mode[2] == ' ' || mode[2] == 0)) {
		run_shell();
	} else {
		check_ids();
		check_clocks();
		check_exec(argv[0][0] == '/' ? argv[0] : "/init");
		check_signal();
		check_futex();
		check_cpus();
		check_memory();
		time_getppid();
		time_fork();
		time_compute();
		check_isolation();
		check_vector_registers();
	}
	char line[sizeof json + 64];
	snprintf(line, sizeof line, "CELLVM-TESTINIT: PASS {%s}\n", json);
	emit(line);
	power_off();
}
