// Vector-register isolation: two processes on one CPU keep distinct patterns
// in the widest vector registers the hardware runs, across many context
// switches, and each checks that its registers come back intact.
//
// The width comes from plain CPUID and XGETBV, executed here in user space.
// On kvm-pvm, plain CPUID is answered by the outer hypervisor and the
// instructions run in hardware, so user space can use AVX-512 even where the
// vCPU's own CPUID table says less: the guest kernel must save and restore
// all of it.
#define _GNU_SOURCE
#include <cpuid.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "testinit.h"

enum width { XMM, YMM, ZMM };
static const char *const width_name[] = {"sse", "avx", "avx512"};

// zmm0-31 (64 bytes each) followed by k0-k7 (8 bytes each, kmovw uses 2).
struct regs {
	uint8_t v[32 * 64];
	uint64_t k[8];
} __attribute__((aligned(64)));

static enum width widest(void)
{
	unsigned a, b, c1 = 0, c, d, b7 = 0, lo = 0, hi;
	__get_cpuid(1, &a, &b, &c1, &d);
	__get_cpuid_count(7, 0, &a, &b7, &c, &d);
	if (c1 & bit_OSXSAVE)
		__asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
	result("cpuid_1_ecx", "\"%#x\"", c1);
	result("cpuid_7_ebx", "\"%#x\"", b7);
	result("xcr0", "\"%#x\"", lo);
	if (!(c1 & bit_OSXSAVE) || !(c1 & bit_AVX) || (lo & 0x6) != 0x6)
		return XMM;
	if ((b7 & bit_AVX512F) && (lo & 0xe6) == 0xe6)
		return ZMM;
	return YMM;
}

#define ALL16 "0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15"
#define ALL32 ALL16 ",16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31"
// sched_yield in a loop, with nothing but the syscall between load and store.
#define YIELD_LOOP "1: mov $24, %%eax\n syscall\n dec %%rdx\n jnz 1b\n"

// Loads the registers from *in, yields the CPU `yields` times, stores them to
// *out. Written as one asm block so the compiler never touches them between.
static __attribute__((noinline)) void hold(enum width w, const struct regs *in, struct regs *out,
					   long yields)
{
	switch (w) {
	case ZMM:
		__asm__ volatile(".irp r," ALL32 "\n vmovdqu64 \\r*64(%%rsi), %%zmm\\r\n .endr\n"
				 ".irp r,0,1,2,3,4,5,6,7\n kmovw 2048+\\r*8(%%rsi), %%k\\r\n .endr\n"
				 YIELD_LOOP
				 ".irp r," ALL32 "\n vmovdqu64 %%zmm\\r, \\r*64(%%rdi)\n .endr\n"
				 ".irp r,0,1,2,3,4,5,6,7\n kmovw %%k\\r, 2048+\\r*8(%%rdi)\n .endr\n"
				 "vzeroupper\n"
				 : "+d"(yields)
				 : "S"(in), "D"(out)
				 : "rax", "rcx", "r11", "memory");
		break;
	case YMM:
		__asm__ volatile(".irp r," ALL16 "\n vmovdqu \\r*64(%%rsi), %%ymm\\r\n .endr\n"
				 YIELD_LOOP
				 ".irp r," ALL16 "\n vmovdqu %%ymm\\r, \\r*64(%%rdi)\n .endr\n"
				 "vzeroupper\n"
				 : "+d"(yields)
				 : "S"(in), "D"(out)
				 : "rax", "rcx", "r11", "memory");
		break;
	case XMM:
		__asm__ volatile(".irp r," ALL16 "\n movdqu \\r*64(%%rsi), %%xmm\\r\n .endr\n"
				 YIELD_LOOP
				 ".irp r," ALL16 "\n movdqu %%xmm\\r, \\r*64(%%rdi)\n .endr\n"
				 : "+d"(yields)
				 : "S"(in), "D"(out)
				 : "rax", "rcx", "r11", "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4",
				   "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12",
				   "xmm13", "xmm14", "xmm15");
		break;
	}
}

// Bytes of struct regs that width w actually holds.
static int held(enum width w, size_t reg, size_t byte)
{
	size_t nregs = w == ZMM ? 32 : 16, bytes = w == ZMM ? 64 : w == YMM ? 32 : 16;
	return reg < nregs && byte < bytes;
}

struct holder {
	enum width w;
	unsigned seed;
	long yields;
};

static void holder(struct holder *h)
{
	cpu_set_t set;
	CPU_ZERO(&set);
	CPU_SET(0, &set);
	if (sched_setaffinity(0, sizeof set, &set))
		_exit(3);
	static struct regs in, out;
	uint32_t x = h->seed;
	for (size_t i = 0; i < sizeof in.v; i++) {
		x = x * 1103515245u + 12345u;
		in.v[i] = (uint8_t)(x >> 16);
	}
	for (int i = 0; i < 8; i++)
		in.k[i] = (h->seed * 0x9e37u + (unsigned)i * 0x3b1u) & 0xffff;
	memset(&out, 0, sizeof out);
	hold(h->w, &in, &out, h->yields);
	for (size_t r = 0; r < 32; r++)
		for (size_t b = 0; b < 64; b++)
			if (held(h->w, r, b) && in.v[r * 64 + b] != out.v[r * 64 + b])
				_exit(10 + (int)r);
	if (h->w == ZMM)
		for (int i = 0; i < 8; i++)
			if ((in.k[i] & 0xffff) != (out.k[i] & 0xffff))
				_exit(50 + i);
}

void check_vector_registers(void)
{
	enum width w = widest();
	long yields = loops(20000);
	struct holder a = {w, 0x1234567u, yields}, b = {w, 0x7654321u, yields};
	pid_t pids[2];
	struct holder *hs[2] = {&a, &b};
	for (int i = 0; i < 2; i++) {
		pids[i] = fork();
		if (pids[i] < 0)
			fail("vector", "fork failed");
		if (pids[i] == 0) {
			alarm(60);
			holder(hs[i]);
			_exit(0);
		}
	}
	for (int i = 0; i < 2; i++) {
		int status;
		if (waitpid(pids[i], &status, 0) != pids[i])
			fail("vector", "waitpid failed");
		if (WIFSIGNALED(status))
			fail("vector", "%s holder killed by signal %d", width_name[w], WTERMSIG(status));
		int code = WEXITSTATUS(status);
		if (code >= 50)
			fail("vector", "%s: k%d changed across context switches", width_name[w], code - 50);
		if (code >= 10)
			fail("vector", "%s: register %d changed across context switches", width_name[w],
			     code - 10);
		if (code)
			fail("vector", "holder exited %d", code);
	}
	result("vector", "\"%s\"", width_name[w]);
	result("vector_switches", "%ld", 2 * yields);
}
