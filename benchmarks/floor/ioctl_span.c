/*
 * LD_PRELOAD helper for benchmarks/vmm.py: timestamps every ioctl() and
 * memfd_create() the process makes, so cellvm's VM+vCPU creation can be timed
 * at the syscall layer (first memfd_create/KVM_CREATE_VM to the end of the
 * last KVM_SET_CPUID2), without the Python call around it. The floor times
 * the same span inside floor.c. Costs two clock_gettime() per call.
 *
 * Read from Python with ctypes.CDLL(None): span_recs[span_n] of {what, t0, t1}
 * (what: the ioctl request, or SPAN_MEMFD), span_now() for a timestamp on
 * the same clock.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdarg.h>
#include <stdint.h>
#include <time.h>

#define SPAN_MAX 65536
#define SPAN_MEMFD 1ul

struct span_rec {
	unsigned long what;
	uint64_t t0, t1;
};
struct span_rec span_recs[SPAN_MAX];
int span_n;

uint64_t span_now(void) {
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static void record(unsigned long what, uint64_t t0) {
	int i = __atomic_fetch_add(&span_n, 1, __ATOMIC_RELAXED);
	if (i < SPAN_MAX)
		span_recs[i] = (struct span_rec){what, t0, span_now()};
}

int ioctl(int fd, unsigned long request, ...) {
	static int (*real)(int, unsigned long, ...);
	if (!real)
		real = (int (*)(int, unsigned long, ...))dlsym(RTLD_NEXT, "ioctl");
	va_list ap;
	va_start(ap, request);
	void *arg = va_arg(ap, void *);
	va_end(ap);
	uint64_t t0 = span_now();
	int ret = real(fd, request, arg);
	record(request, t0);
	return ret;
}

int memfd_create(const char *name, unsigned int flags) {
	static int (*real)(const char *, unsigned int);
	if (!real)
		real = (int (*)(const char *, unsigned int))dlsym(RTLD_NEXT, "memfd_create");
	uint64_t t0 = span_now();
	int ret = real(name, flags);
	record(SPAN_MEMFD, t0);
	return ret;
}
