// Isolation probes: a user process must not read or write guest kernel memory.
//
// For each kernel address, one child reads it and another reads it and
// writes the same value back (harmless if it ever succeeds). Both must die
// of SIGSEGV. The fixed addresses assume the x86-64 layout without KASLR
// (CONFIG_RANDOMIZE_BASE=n); cellvm.kaddrs=name:0xADDR,... adds more (the
// boot tests pass symbols from System.map), cellvm.probes=name,... keeps only
// the named fixed ones.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "testinit.h"

struct probe {
	char name[32];
	uintptr_t addr;
};

static const struct probe fixed[] = {
	{"text", 0xffffffff81000000ul},          // _text, start of the entry text
	{"direct_map", 0xffff888000100000ul},    // physical 1 MiB through the direct map
	{"direct_map_image", 0xffff888001000000ul}, // the kernel image through the direct map
	{"cea_idt", 0xfffffe0000000000ul},       // cpu_entry_area: read-only IDT
	{"cea_gdt", 0xfffffe0000001000ul},       // CPU 0's GDT in the cpu_entry_area
	{"cea_entry_stack", 0xfffffe0000002000ul}, // CPU 0's entry trampoline stack
	{"cea_tss", 0xfffffe0000003000ul},       // CPU 0's TSS (holds RSP0)
};

static void probe_read(uintptr_t addr)
{
	volatile uint64_t *p = (volatile uint64_t *)addr;
	(void)*p;
}

static void probe_write(uintptr_t addr)
{
	volatile uint64_t *p = (volatile uint64_t *)addr;
	uint64_t v = *p;
	*p = v;
}

// Returns NULL if the access faulted as it must, else what went wrong.
static const char *run_probe(uintptr_t addr, int write)
{
	pid_t pid = fork();
	if (pid < 0)
		return "fork failed";
	if (pid == 0) {
		alarm(10);
		if (write)
			probe_write(addr);
		else
			probe_read(addr);
		_exit(0);
	}
	int status;
	if (waitpid(pid, &status, 0) != pid)
		return "waitpid failed";
	if (WIFSIGNALED(status) && WTERMSIG(status) == SIGSEGV)
		return NULL;
	if (WIFEXITED(status) && WEXITSTATUS(status) == 0)
		return write ? "write succeeded" : "read succeeded";
	return "child ended without SIGSEGV";
}

void check_isolation(void)
{
	struct probe probes[32];
	int n = 0;
	// cellvm.probes=name,name restricts the fixed list (for debugging).
	const char *only = param("cellvm.probes");
	for (size_t i = 0; i < sizeof fixed / sizeof fixed[0]; i++) {
		size_t len = strlen(fixed[i].name);
		const char *hit = only ? strstr(only, fixed[i].name) : NULL;
		if (!only || (hit && (hit[len] == ',' || hit[len] == ' ' || hit[len] == 0)))
			probes[n++] = fixed[i];
	}
	const char *v = param("cellvm.kaddrs");
	while (v && *v && *v != ' ' && n < 32) {
		const char *colon = strchr(v, ':');
		if (!colon)
			break;
		size_t len = (size_t)(colon - v) < sizeof probes[n].name - 1 ? (size_t)(colon - v)
									       : sizeof probes[n].name - 1;
		memcpy(probes[n].name, v, len);
		probes[n].name[len] = 0;
		char *end;
		probes[n++].addr = strtoul(colon + 1, &end, 16);
		v = *end == ',' ? end + 1 : end;
	}

	// Unhandled-signal reports would put 2n lines on a slow serial console.
	int fd = open("/proc/sys/debug/exception-trace", O_WRONLY);
	if (fd >= 0) {
		if (write(fd, "0", 1) != 1) {
		}
		close(fd);
	}
	for (int i = 0; i < n; i++) {
		for (int write = 0; write <= 1; write++) {
			const char *err = run_probe(probes[i].addr, write);
			if (err)
				fail("isolation", "user %s of kernel %s at 0x%lx: %s",
				     write ? "write" : "read", probes[i].name,
				     (unsigned long)probes[i].addr, err);
		}
	}
	result("isolation_probes", "%d", 2 * n);
}
