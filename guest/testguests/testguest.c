/*
 * One freestanding test guest with several modes, chosen by the VMM through
 * the parameter page. Each mode ends with one machine-readable result: an
 * exit code written to the test device (0 = success), its figures left in
 * the results page for the host to read.
 *
 * Parameters (u64 words at 0x5000):
 *   [0] mode  [1] vCPUs  [2] a  [3] b  [4] unused  [5] PVM native flags (0: stay emulated)
 * MODE_MARKS and MODE_DIRTY read `a` again while they run (volatile), so the
 * host can change it in a paused or restored machine.
 * Results (u64 words at 0x6000): see the RESULT_* offsets below; the host
 * side mirror is tests/support/testguest.py.
 */
typedef unsigned long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

enum { MODE_COUNTER = 1, MODE_SYSCALLS = 2, MODE_MMIO_LOOP = 3, MODE_FAULT = 4, MODE_MARKS = 5, MODE_DIRTY = 6,
       MODE_VIRTIO_RNG = 7 };
enum { FAULT_TRIPLE_NATIVE = 1, FAULT_BAD_INT_NATIVE = 2, FAULT_TRIPLE_EMULATED = 3 };

#define PARAMS ((volatile u64 *)0x5000)
#define RESULTS 0x6000ul
#define RESULT(off) (*(volatile u64 *)(RESULTS + (off)))
#define RESULT_COUNTER(i) RESULT(0x000 + 8 * (i))
#define RESULT_CS_NATIVE(i) RESULT(0x040 + 8 * (i))
#define RESULT_DONE RESULT(0x080)
#define RESULT_HYPERCALL_RET RESULT(0x088)
#define RESULT_HYPERCALL_CYCLES RESULT(0x090)
#define RESULT_SYSCALL_CYCLES RESULT(0x098)
#define RESULT_USER_CS RESULT(0x0a0)
#define RESULT_MMIO_CYCLES RESULT(0x0a8)
#define RESULT_LOAD_IDT_RET RESULT(0x0b0)
#define RESULT_KERNEL_CS_IN_SYSCALL RESULT(0x0b8)
#define RESULT_EXCEPTION_VECTOR RESULT(0x0c0)
#define RESULT_EXCEPTION_RIP RESULT(0x0c8)
#define RESULT_VIRTIO ((volatile u64 *)(RESULTS + 0x0d0)) /* 3 words, see virtio_rng.c */

#define TESTDEV 0xd0000000ul
#define TESTDEV_EXIT 0x008
#define TESTDEV_MARK 0x010
#define TESTDEV_SINK 0x018
#define TESTDEV_REPORT(i) (0x100 + 8 * (i))

#define MSR_LSTAR 0xc0000082u
#define MSR_STAR 0xc0000081u
#define MSR_PVM_NATIVE 0x4b564d10u
#define VIF_PAGE(i) (0x20000ul + 0x1000ul * (i))
#define USER_STACK_TOP(i) (0x90000ul + 0x2000ul * ((i) + 1))

/* This host's PVM hypercalls (int $0x1b; NATIVE-MODE-ENTRY.md section 5). */
#define HC_LOAD_IDT 0x1005
#define HC_WRMSR 0x1003
#define HC_HALT 0x1009
#define HC_UNKNOWN 0x1fff

#define SYS_NULL 0
#define SYS_EXIT 60

extern char syscall_entry[], exception_stubs[];
void virtio_rng_request(u64 variant, volatile u64 *out);

static inline void mmio_write(u64 offset, u64 value) { *(volatile u64 *)(TESTDEV + offset) = value; }

/* The console: COM1's transmit register, one port I/O exit per byte. */
static void console_print(const char *text) {
	for (; *text; text++)
		__asm__ volatile("outb %0, %1" ::"a"(*text), "Nd"((u16)0x3f8));
}

static inline u64 rdtsc(void) {
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}

static inline u16 read_cs(void) {
	u16 cs;
	__asm__ volatile("mov %%cs, %0" : "=r"(cs));
	return cs;
}

static inline long hypercall(long nr, long a1, long a2, long a3) {
	long ret;
	__asm__ volatile("int $0x1b" : "=a"(ret) : "a"(nr), "b"(a1), "c"(a2), "d"(a3) : "memory");
	return ret;
}

static inline void wrmsr(u32 msr, u64 value) {
	__asm__ volatile("wrmsr" ::"c"(msr), "a"((u32)value), "d"((u32)(value >> 32)) : "memory");
}

static void __attribute__((noreturn)) halt_forever(int native) {
	for (;;) {
		if (native)
			hypercall(HC_HALT, 0, 0, 0);
		else
			__asm__ volatile("hlt");
	}
}

static void __attribute__((noreturn)) guest_exit(u64 code, int native) {
	console_print(code == 0 ? "testguest: ok\n" : "testguest: failed\n");
	mmio_write(TESTDEV_EXIT, code);
	halt_forever(native);
}

/* Enter native supervisor mode: the instruction after this WRMSR runs natively. */
static void opt_in(u64 vcpu, u64 flags) {
	wrmsr(MSR_PVM_NATIVE, VIF_PAGE(vcpu) | flags);
	RESULT_CS_NATIVE(vcpu) = read_cs();
}

static void run_counter(u64 vcpu, u64 vcpus, u64 iterations, u64 report_every, int native) {
	if (report_every == 0)
		report_every = 1ul << 20;
	for (u64 n = 1; iterations == 0 || n <= iterations; n++) {
		RESULT_COUNTER(vcpu) = n;
		if (n % report_every == 0)
			mmio_write(TESTDEV_REPORT(vcpu), n);
	}
	__atomic_fetch_add(&RESULT_DONE, 1, __ATOMIC_SEQ_CST);
	if (vcpu != 0)
		halt_forever(native);
	while (__atomic_load_n(&RESULT_DONE, __ATOMIC_SEQ_CST) < vcpus)
		__asm__ volatile("pause");
	guest_exit(0, native);
}

/* ---------------------------------------------------------------- syscalls */

struct idt_gate {
	u16 offset_low, selector;
	u8 ist, type_attr;
	u16 offset_mid;
	u32 offset_high, reserved;
} __attribute__((packed));

static struct idt_gate idt[32] __attribute__((aligned(16)));

void __attribute__((noreturn)) report_exception(u64 vector, u64 *frame) {
	/* frame: [error code,] RIP, CS, ... ; vectors 8, 10-14, 17 push an error code */
	int has_error = vector == 8 || (vector >= 10 && vector <= 14) || vector == 17;
	RESULT_EXCEPTION_VECTOR = vector;
	RESULT_EXCEPTION_RIP = frame[has_error ? 1 : 0];
	guest_exit(0x100 + vector, 1);
}

void __attribute__((noreturn)) kernel_sys_exit(u64 code) {
	RESULT_KERNEL_CS_IN_SYSCALL = read_cs();
	guest_exit(code, 1);
}

static inline long user_syscall(long nr, long arg) {
	long ret;
	__asm__ volatile("syscall" : "=a"(ret) : "a"(nr), "D"(arg) : "rcx", "r11", "memory");
	return ret;
}

static void __attribute__((noreturn)) user_main(u64 iterations) {
	RESULT_USER_CS = read_cs();
	u64 start = rdtsc();
	for (u64 n = 0; n < iterations; n++)
		user_syscall(SYS_NULL, 0);
	RESULT_SYSCALL_CYCLES = rdtsc() - start;
	user_syscall(SYS_EXIT, 0);
	for (;;)
		;
}

/* Fast SYSRET (`int $0x19`, flag bit 3): RIP <- RCX, RFLAGS <- R11, CS/SS user. */
static void __attribute__((noreturn)) enter_user(void (*entry)(u64), u64 stack_top, u64 arg) {
	register u64 r11 __asm__("r11") = 0x202;
	__asm__ volatile("mov %0, %%rsp\n\tint $0x19" ::"r"(stack_top), "c"(entry), "D"(arg), "r"(r11) : "memory");
	__builtin_unreachable();
}

static void run_syscalls(u64 iterations) {
	for (int v = 0; v < 32; v++) {
		u64 handler = (u64)exception_stubs + 16 * v;
		idt[v] = (struct idt_gate){
			.offset_low = handler & 0xffff, .selector = 0x10, .ist = 0, .type_attr = 0x8e,
			.offset_mid = (handler >> 16) & 0xffff, .offset_high = handler >> 32, .reserved = 0};
	}
	RESULT_LOAD_IDT_RET = hypercall(HC_LOAD_IDT, (long)idt, sizeof idt - 1, 0);
	hypercall(HC_WRMSR, MSR_STAR, (0x23ul << 48) | (0x10ul << 32), 0);
	hypercall(HC_WRMSR, MSR_LSTAR, (long)syscall_entry, 0);

	RESULT_HYPERCALL_RET = hypercall(HC_UNKNOWN, 0, 0, 0);
	u64 start = rdtsc();
	for (u64 n = 0; n < iterations; n++)
		hypercall(HC_UNKNOWN, 0, 0, 0);
	RESULT_HYPERCALL_CYCLES = rdtsc() - start;

	enter_user(user_main, USER_STACK_TOP(0), iterations);
}

static void run_mmio_loop(u64 iterations, int native) {
	u64 start = rdtsc();
	for (u64 n = 0; n < iterations; n++)
		mmio_write(TESTDEV_SINK, n);
	RESULT_MMIO_CYCLES = rdtsc() - start;
	guest_exit(0, native);
}

/* ------------------------------------------------------ snapshot benchmarks */

/*
 * MODE_MARKS (vCPU 0; the others halt): spin `every` iterations touching no
 * memory, write mark n (n = 1, 2, ...), again. It halts for good after mark
 * n = PARAMS[2] (0: never), re-read at every mark: a host that pauses the
 * machine after mark k and sets it to k + 1 gets restored copies that each
 * write exactly one mark (k + 1) and then sleep.
 */
static void run_marks(u64 every, int native) {
	if (every == 0)
		every = 4096;
	for (u64 n = 1;; n++) {
		for (u64 i = 0; i < every; i++)
			__asm__ volatile("" ::: "memory");
		mmio_write(TESTDEV_MARK, n);
		if (PARAMS[2] != 0 && n >= PARAMS[2])
			halt_forever(native);
	}
}

/*
 * MODE_DIRTY (vCPU 0; the others halt): mark 0 once waiting, then wait for
 * PARAMS[2] = N != 0, write one word into each 4 KiB page of the N MiB from
 * DIRTY_BASE, clear PARAMS[2], write mark N and halt. The host snapshots
 * the waiting guest, restores it, sets N and times the diff snapshot.
 */
#define DIRTY_BASE 0x1000000ul
static void run_dirty(int native) {
	u64 mib;
	mmio_write(TESTDEV_MARK, 0);
	while ((mib = PARAMS[2]) == 0)
		__asm__ volatile("pause");
	u64 stamp = rdtsc();
	for (u64 off = 0; off < (mib << 20); off += 4096)
		*(volatile u64 *)(DIRTY_BASE + off) = stamp + off;
	PARAMS[2] = 0;
	mmio_write(TESTDEV_MARK, mib);
	halt_forever(native);
}

static void run_fault(u64 kind) {
	console_print("testguest: faulting on purpose\n");
	switch (kind) {
	case FAULT_TRIPLE_NATIVE:
	case FAULT_TRIPLE_EMULATED:
		/* No IDT (limit 0): #UD cannot be delivered -> #DF -> triple fault. */
		__asm__ volatile("ud2");
		break;
	case FAULT_BAD_INT_NATIVE:
		/* Only vectors 0x17/0x19/0x1a/0x1b are host services; the host fails to emulate others. */
		__asm__ volatile("int $0x42");
		break;
	}
	guest_exit(1, 1);
}

void __attribute__((noreturn)) guest_main(u64 vcpu, volatile u64 *params) {
	u64 mode = params[0], vcpus = params[1], a = params[2], b = params[3], native_flags = params[5];
	int native = native_flags != 0;
	if (native && !(mode == MODE_FAULT && a == FAULT_TRIPLE_EMULATED))
		opt_in(vcpu, native_flags);
	else
		RESULT_CS_NATIVE(vcpu) = read_cs();

	switch (mode) {
	case MODE_COUNTER:
		run_counter(vcpu, vcpus, a, b, native);
		break;
	case MODE_SYSCALLS:
		if (vcpu == 0)
			run_syscalls(a);
		break;
	case MODE_MMIO_LOOP:
		if (vcpu == 0)
			run_mmio_loop(a, native);
		break;
	case MODE_FAULT:
		if (vcpu == 0)
			run_fault(a);
		break;
	case MODE_MARKS:
		if (vcpu == 0)
			run_marks(b, native);
		break;
	case MODE_DIRTY:
		if (vcpu == 0)
			run_dirty(native);
		break;
	case MODE_VIRTIO_RNG:
		if (vcpu == 0) {
			virtio_rng_request(a, RESULT_VIRTIO);
			guest_exit(0, native);
		}
		break;
	default:
		if (vcpu == 0)
			guest_exit(0xbad, native);
	}
	halt_forever(native);
}
