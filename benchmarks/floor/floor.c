/*
 * The raw-ioctl floor for benchmarks/vmm.py: the same operations cellvm's
 * VMM performs, done by the shortest C program that can do them on this
 * host's /dev/kvm. No cellvm code is linked or included: the boot tables,
 * ELF loader and exit loop below are written independently from the
 * memory layout documented in csrc/vm/x86_boot.h and the PVM facts in
 * ../shared/guest-kernel/ (memslot before irqchip; kernel pages with U/S=1;
 * user PML4 twin at PML4 + 0x1000).
 *
 * usage: floor TESTGUEST.ELF CREATE_N MMIO_ITERS SYSCALL_ITERS
 * prints one JSON object on stdout (times in ns unless the key says so):
 *   create_ns        [CREATE_N] CREATE_VM -> vCPU ready (memfd RAM, memslot,
 *                    irqchip, vCPU + kvm_run mmap, SET_CPUID2), /dev/kvm fd
 *                    and KVM_GET_SUPPORTED_CPUID reused (per process, as in
 *                    cellvm's Kvm::instance())
 *   cold_ns          the process's first VM: open(/dev/kvm), KVM_GET_VCPU_MMAP_SIZE,
 *                    KVM_GET_SUPPORTED_CPUID, then the creation above
 *   destroy_ns       [CREATE_N] tearing that VM down (munmap, close vCPU, VM, memfd)
 *   open_ns          [CREATE_N] open(/dev/kvm) + KVM_GET_SUPPORTED_CPUID
 *   steps_ns         per-step medians of the creations
 *   mmio             MMIO_LOOP run: guest cycles, host wall from the first
 *                    KVM_RUN to the exit store, exits seen by this process
 *   syscalls         SYSCALLS run: guest-rdtsc hypercall and syscall cycles
 */
#define _GNU_SOURCE
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MEM_SIZE (64ul << 20)
#define GDT 0x1000ul
#define TSS 0x3000ul
#define PARAMS 0x5000ul
#define RESULTS 0x6000ul
#define PML4 0x8000ul
#define PDPT 0xa000ul
#define PD 0xb000ul
#define KSTACK_TOP 0x44000ul /* vCPU 0 */
#define ISTACK_TOP 0x82000ul /* vCPU 0: TSS.RSP0 */
#define TESTDEV 0xd0000000ul
#define TESTDEV_EXIT (TESTDEV + 0x8)
#define PVM_FLAGS 0x0ful
#define MODE_SYSCALLS 2
#define MODE_MMIO_LOOP 3

static void die(const char *what) {
	fprintf(stderr, "floor: %s: %s\n", what, strerror(errno));
	exit(1);
}

static int xioctl(int fd, unsigned long req, void *arg, const char *name) {
	int r;
	do
		r = ioctl(fd, req, arg);
	while (r < 0 && errno == EINTR);
	if (r < 0)
		die(name);
	return r;
}
#define IOCTL(fd, req, arg) xioctl(fd, req, (void *)(arg), #req)

static uint64_t now_ns(void) {
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static int cmp_u64(const void *a, const void *b) {
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

static uint64_t median(uint64_t *v, int n) {
	qsort(v, n, sizeof *v, cmp_u64);
	return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/* ------------------------------------------------------------ the VM */

static int kvm_fd = -1;
static struct kvm_cpuid2 *cpuid;
static size_t run_size;

struct vm {
	int vm, vcpu, memfd;
	uint8_t *mem;
	struct kvm_run *run;
};

static void get_supported_cpuid(void) {
	for (int n = 128;; n *= 2) {
		free(cpuid);
		cpuid = calloc(1, sizeof *cpuid + n * sizeof(struct kvm_cpuid_entry2));
		cpuid->nent = n;
		if (ioctl(kvm_fd, KVM_GET_SUPPORTED_CPUID, cpuid) == 0)
			break;
		if (errno != E2BIG || n > 4096)
			die("KVM_GET_SUPPORTED_CPUID");
	}
	/* vCPU 0: APIC ID 0 in leaf 1 and the x2APIC topology leaves */
	for (unsigned i = 0; i < cpuid->nent; i++) {
		struct kvm_cpuid_entry2 *e = &cpuid->entries[i];
		if (e->function == 1)
			e->ebx &= 0x00ffffff;
		if (e->function == 0xb || e->function == 0x1f)
			e->edx = 0;
	}
}

static void open_kvm(void) {
	kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm_fd < 0)
		die("open /dev/kvm");
	run_size = IOCTL(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
	get_supported_cpuid();
}

enum { S_VM, S_MEM, S_SLOT, S_IRQCHIP, S_VCPU, S_CPUID, S_N };
static const char *step_names[S_N] = {"create_vm", "memfd_mmap", "memslot", "irqchip", "vcpu_mmap", "set_cpuid"};

/* The same steps, in the same order, as cellvm's Machine constructor. */
static void vm_create(struct vm *v, uint64_t *steps) {
	uint64_t t = now_ns(), u;
#define STEP(s) (u = now_ns(), steps ? steps[s] = u - t : 0, t = u)
	v->vm = IOCTL(kvm_fd, KVM_CREATE_VM, 0);
	STEP(S_VM);
	v->memfd = memfd_create("floor-ram", MFD_CLOEXEC);
	if (v->memfd < 0 || ftruncate(v->memfd, MEM_SIZE) < 0)
		die("memfd");
	v->mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, v->memfd, 0);
	if (v->mem == MAP_FAILED)
		die("mmap ram");
	STEP(S_MEM);
	/* before the irqchip: on this PVM host a slot added after it costs ~10 ms */
	struct kvm_userspace_memory_region region = {
		.slot = 0, .guest_phys_addr = 0, .memory_size = MEM_SIZE, .userspace_addr = (uint64_t)v->mem};
	IOCTL(v->vm, KVM_SET_USER_MEMORY_REGION, &region);
	STEP(S_SLOT);
	IOCTL(v->vm, KVM_CREATE_IRQCHIP, 0);
	STEP(S_IRQCHIP);
	v->vcpu = IOCTL(v->vm, KVM_CREATE_VCPU, 0);
	v->run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->vcpu, 0);
	if (v->run == MAP_FAILED)
		die("mmap kvm_run");
	STEP(S_VCPU);
	IOCTL(v->vcpu, KVM_SET_CPUID2, cpuid);
	STEP(S_CPUID);
#undef STEP
}

static void vm_destroy(struct vm *v) {
	munmap(v->run, run_size);
	close(v->vcpu);
	close(v->vm);
	munmap(v->mem, MEM_SIZE);
	close(v->memfd);
}

/* ------------------------------------------------------------ boot state */

static void put64(struct vm *v, uint64_t gpa, uint64_t val) { memcpy(v->mem + gpa, &val, 8); }

static uint64_t get64(struct vm *v, uint64_t gpa) {
	uint64_t val;
	memcpy(&val, v->mem + gpa, 8);
	return val;
}

/* flat 64-bit descriptor: P, DPL, S, type; code G+L, data G+D/B */
static uint64_t seg_desc(int code, int dpl) {
	uint64_t access = 0x90 | (uint64_t)dpl << 5 | (code ? 0xb : 0x3);
	return 0xffffull | access << 40 | 0xfull << 48 | (uint64_t)(code ? 0xa : 0xc) << 52;
}

static void write_boot_tables(struct vm *v) {
	put64(v, GDT + 0x10, seg_desc(1, 0));
	put64(v, GDT + 0x18, seg_desc(0, 0));
	put64(v, GDT + 0x28, seg_desc(0, 3));
	put64(v, GDT + 0x30, seg_desc(1, 3));
	put64(v, GDT + 0x40, 0x67 | (TSS & 0xffffff) << 16 | 0x89ull << 40); /* 64-bit TSS, 16 bytes */
	put64(v, GDT + 0x48, 0);
	put64(v, TSS + 4, ISTACK_TOP);
	uint16_t iomap = 0x68;
	memcpy(v->mem + TSS + 0x66, &iomap, 2);
	const uint64_t f = 7; /* P | RW | US on every level: PVM runs the kernel at CPL3 */
	put64(v, PML4, PDPT | f);
	put64(v, PML4 + 0x1000, PDPT | f); /* user twin for PVM's KPTI mode */
	for (uint64_t g = 0; g < 4; g++) {
		put64(v, PDPT + 8 * g, (PD + 0x1000 * g) | f);
		for (uint64_t i = 0; i < 512; i++)
			put64(v, PD + 0x1000 * g + 8 * i, (g << 30 | i << 21) | f | 0x80);
	}
}

static uint64_t load_elf(struct vm *v, const char *path) {
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	struct stat st;
	if (fd < 0 || fstat(fd, &st) < 0)
		die(path);
	uint8_t *file = mmap(NULL, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
	if (file == MAP_FAILED)
		die("mmap elf");
	Elf64_Ehdr *eh = (Elf64_Ehdr *)file;
	if (memcmp(eh->e_ident, ELFMAG, SELFMAG) != 0) {
		fprintf(stderr, "floor: %s: not an ELF\n", path);
		exit(1);
	}
	Elf64_Phdr *ph = (Elf64_Phdr *)(file + eh->e_phoff);
	for (int i = 0; i < eh->e_phnum; i++) {
		if (ph[i].p_type != PT_LOAD)
			continue;
		if (ph[i].p_paddr + ph[i].p_memsz > MEM_SIZE) {
			fprintf(stderr, "floor: segment out of RAM\n");
			exit(1);
		}
		memcpy(v->mem + ph[i].p_paddr, file + ph[i].p_offset, ph[i].p_filesz);
		memset(v->mem + ph[i].p_paddr + ph[i].p_filesz, 0, ph[i].p_memsz - ph[i].p_filesz);
	}
	uint64_t entry = eh->e_entry;
	munmap(file, st.st_size);
	close(fd);
	return entry;
}

static void boot(struct vm *v, const char *elf, uint64_t mode, uint64_t a) {
	write_boot_tables(v);
	uint64_t params[6] = {mode, 1, a, 0, 0, PVM_FLAGS};
	memcpy(v->mem + PARAMS, params, sizeof params);
	uint64_t entry = load_elf(v, elf);

	struct kvm_sregs s;
	IOCTL(v->vcpu, KVM_GET_SREGS, &s);
	struct kvm_segment cs = {.base = 0, .limit = 0xffffffff, .selector = 0x10, .type = 0xb,
				 .present = 1, .s = 1, .l = 1, .g = 1};
	struct kvm_segment ds = cs;
	ds.selector = 0x18, ds.type = 0x3, ds.l = 0, ds.db = 1;
	s.cs = cs;
	s.ds = s.es = s.fs = s.gs = s.ss = ds;
	memset(&s.tr, 0, sizeof s.tr);
	s.tr.base = TSS, s.tr.limit = 0x67, s.tr.selector = 0x40, s.tr.type = 0xb, s.tr.present = 1;
	memset(&s.ldt, 0, sizeof s.ldt);
	s.ldt.unusable = 1;
	s.gdt.base = GDT, s.gdt.limit = 0xff;
	s.idt.base = 0, s.idt.limit = 0;
	s.cr0 = 0x80050033, s.cr3 = PML4, s.cr4 = 0x20, s.efer = 0xd01;
	IOCTL(v->vcpu, KVM_SET_SREGS, &s);
	struct kvm_regs r = {.rip = entry, .rsp = KSTACK_TOP, .rdi = 0, .rsi = PARAMS, .rflags = 2};
	IOCTL(v->vcpu, KVM_SET_REGS, &r);
}

/* One counter of the vCPU's KVM binary stats (KVM_GET_STATS_FD), 0 if absent. */
static uint64_t vcpu_stat(struct vm *v, const char *name) {
	int fd = ioctl(v->vcpu, KVM_GET_STATS_FD, 0);
	if (fd < 0)
		return 0;
	struct kvm_stats_header h;
	uint64_t value = 0;
	if (pread(fd, &h, sizeof h, 0) == sizeof h) {
		size_t dsize = sizeof(struct kvm_stats_desc) + h.name_size;
		uint8_t *buf = malloc(dsize * h.num_desc);
		if (pread(fd, buf, dsize * h.num_desc, h.desc_offset) == (ssize_t)(dsize * h.num_desc)) {
			for (uint32_t i = 0; i < h.num_desc; i++) {
				struct kvm_stats_desc *d = (struct kvm_stats_desc *)(buf + i * dsize);
				if (strncmp(d->name, name, h.name_size) == 0) {
					if (pread(fd, &value, 8, h.data_offset + d->offset) != 8)
						value = 0;
					break;
				}
			}
		}
		free(buf);
	}
	close(fd);
	return value;
}

struct run_result {
	uint64_t wall_ns, mmio_exits, io_exits, exit_code;
};

/* KVM_RUN until the guest stores its exit code to the test device. */
static struct run_result run(struct vm *v) {
	struct run_result res = {0};
	uint64_t t0 = now_ns();
	for (;;) {
		if (ioctl(v->vcpu, KVM_RUN, 0) < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			die("KVM_RUN");
		}
		switch (v->run->exit_reason) {
		case KVM_EXIT_MMIO:
			res.mmio_exits++;
			if (v->run->mmio.is_write && v->run->mmio.phys_addr == TESTDEV_EXIT) {
				res.wall_ns = now_ns() - t0;
				memcpy(&res.exit_code, v->run->mmio.data, 8);
				return res;
			}
			if (!v->run->mmio.is_write)
				memset(v->run->mmio.data, 0, sizeof v->run->mmio.data);
			break;
		case KVM_EXIT_IO:
			res.io_exits++; /* the console's bytes: dropped */
			break;
		default:
			fprintf(stderr, "floor: unexpected exit reason %u\n", v->run->exit_reason);
			exit(1);
		}
	}
}

#ifdef FLOOR_LIB
/*
 * Built with -DFLOOR_LIB -shared, vmm.py also loads this file into its own
 * Python process (ctypes) and alternates floor_create_once() with cellvm's
 * Machine(): the same ioctls timed in C, in the same process as cellvm.
 * Returns CREATE_VM -> vCPU ready in ns; the VM is torn down untimed.
 */
uint64_t floor_create_once(void) {
	if (kvm_fd < 0)
		open_kvm();
	struct vm v;
	uint64_t t = now_ns();
	vm_create(&v, NULL);
	t = now_ns() - t;
	vm_destroy(&v);
	return t;
}
#else
int main(int argc, char **argv) {
	if (argc != 5) {
		fprintf(stderr, "usage: %s TESTGUEST.ELF CREATE_N MMIO_ITERS SYSCALL_ITERS\n", argv[0]);
		return 2;
	}
	const char *elf = argv[1];
	int create_n = atoi(argv[2]);
	uint64_t mmio_iters = strtoull(argv[3], NULL, 0), syscall_iters = strtoull(argv[4], NULL, 0);
	if (create_n < 1)
		create_n = 1;

	uint64_t *open_ns = calloc(create_n, 8), *create_ns = calloc(create_n, 8), *destroy_ns = calloc(create_n, 8);
	uint64_t *steps[S_N];
	for (int s = 0; s < S_N; s++)
		steps[s] = calloc(create_n, 8);

	/* cold: the first VM of this process, /dev/kvm opening included */
	uint64_t cold_ns;
	{
		struct vm v;
		uint64_t t = now_ns();
		open_kvm();
		vm_create(&v, NULL);
		cold_ns = now_ns() - t;
		vm_destroy(&v);
		close(kvm_fd);
	}
	/* open(/dev/kvm) + supported CPUID: cellvm does this once per process */
	for (int i = 0; i < create_n; i++) {
		uint64_t t = now_ns();
		open_kvm();
		open_ns[i] = now_ns() - t;
		close(kvm_fd);
	}
	open_kvm();
	{ /* one untimed warm-up, as vmm.py discards cellvm's first construction */
		struct vm v;
		vm_create(&v, NULL);
		vm_destroy(&v);
	}
	for (int i = 0; i < create_n; i++) {
		struct vm v;
		uint64_t st[S_N];
		uint64_t t = now_ns();
		vm_create(&v, st);
		create_ns[i] = now_ns() - t;
		for (int s = 0; s < S_N; s++)
			steps[s][i] = st[s];
		t = now_ns();
		vm_destroy(&v);
		destroy_ns[i] = now_ns() - t;
	}

	struct vm v;
	vm_create(&v, NULL);
	boot(&v, elf, MODE_MMIO_LOOP, mmio_iters);
	struct run_result mmio = run(&v);
	uint64_t mmio_cycles = get64(&v, RESULTS + 0xa8), mmio_cs = get64(&v, RESULTS + 0x40);
	uint64_t mmio_kvm_exits = vcpu_stat(&v, "exits");
	int64_t tsc_khz = ioctl(v.vcpu, KVM_GET_TSC_KHZ, 0);
	vm_destroy(&v);

	vm_create(&v, NULL);
	boot(&v, elf, MODE_SYSCALLS, syscall_iters);
	struct run_result sys = run(&v);
	uint64_t hc_cycles = get64(&v, RESULTS + 0x90), sc_cycles = get64(&v, RESULTS + 0x98);
	int64_t hc_ret = (int64_t)get64(&v, RESULTS + 0x88);
	uint64_t sys_cs = get64(&v, RESULTS + 0x40), user_cs = get64(&v, RESULTS + 0xa0);
	uint64_t sys_kvm_exits = vcpu_stat(&v, "exits");
	vm_destroy(&v);

	printf("{\"tsc_khz\": %lld, \"create_n\": %d, \"cold_ns\": %llu,\n", (long long)tsc_khz, create_n,
	       (unsigned long long)cold_ns);
	printf(" \"create_ns\": [");
	for (int i = 0; i < create_n; i++)
		printf("%s%llu", i ? ", " : "", (unsigned long long)create_ns[i]);
	printf("],\n \"destroy_ns\": [");
	for (int i = 0; i < create_n; i++)
		printf("%s%llu", i ? ", " : "", (unsigned long long)destroy_ns[i]);
	printf("],\n \"open_ns\": [");
	for (int i = 0; i < create_n; i++)
		printf("%s%llu", i ? ", " : "", (unsigned long long)open_ns[i]);
	printf("],\n \"steps_ns\": {");
	for (int s = 0; s < S_N; s++)
		printf("%s\"%s\": %llu", s ? ", " : "", step_names[s], (unsigned long long)median(steps[s], create_n));
	printf("},\n");
	printf(" \"mmio\": {\"iterations\": %llu, \"cycles\": %llu, \"wall_ns\": %llu, \"mmio_exits\": %llu, "
	       "\"io_exits\": %llu, \"kvm_exits\": %llu, \"exit_code\": %llu, \"cs_native\": %llu},\n",
	       (unsigned long long)mmio_iters, (unsigned long long)mmio_cycles, (unsigned long long)mmio.wall_ns,
	       (unsigned long long)mmio.mmio_exits, (unsigned long long)mmio.io_exits, (unsigned long long)mmio_kvm_exits,
	       (unsigned long long)mmio.exit_code, (unsigned long long)mmio_cs);
	printf(" \"syscalls\": {\"iterations\": %llu, \"hypercall_cycles\": %llu, \"syscall_cycles\": %llu, "
	       "\"hypercall_ret\": %lld, \"wall_ns\": %llu, \"kvm_exits\": %llu, \"exit_code\": %llu, \"cs_native\": %llu, \"user_cs\": %llu}}\n",
	       (unsigned long long)syscall_iters, (unsigned long long)hc_cycles, (unsigned long long)sc_cycles,
	       (long long)hc_ret, (unsigned long long)sys.wall_ns, (unsigned long long)sys_kvm_exits,
	       (unsigned long long)sys.exit_code,
	       (unsigned long long)sys_cs, (unsigned long long)user_cs);
	return 0;
}
#endif
