#include "vm/x86_boot.h"

#include <stdexcept>

#include "vm/memory.h"

namespace cellvm::x86 {

namespace {

constexpr uint64_t kPdpt = 0xa000, kPd = 0xb000, kGdtLimit = 0xff;
constexpr uint64_t kPresent = 1, kWritable = 2, kUser = 4, kHuge = 0x80;
constexpr uint64_t kTableFlags = kPresent | kWritable | kUser;
constexpr uint64_t kTssSize = 0x68;
constexpr int kTssSelector0 = 0x40;

// A flat 64-bit code or data segment descriptor.
constexpr uint64_t segment(bool code, int dpl) {
  uint64_t type = code ? 0xb : 0x3;  // code: execute/read, accessed; data: read/write, accessed
  uint64_t access = (1ull << 7) | (uint64_t(dpl) << 5) | (1ull << 4) | type;  // P, DPL, S
  uint64_t flags = code ? 0xa : 0xc;                                            // G+L, or G+D/B
  return 0xffffull | (access << 40) | (0xfull << 48) | (flags << 52);
}

}  // namespace

void write_boot_tables(GuestMemory& memory, int vcpus) {
  if (vcpus < 1 || vcpus > kMaxVcpus) throw std::invalid_argument("vcpus must be 1..8");
  if (memory.size() < 0x100000) throw std::invalid_argument("guest memory must be at least 1 MiB");

  memory.store<uint64_t>(kGdt + 0x10, segment(true, 0));
  memory.store<uint64_t>(kGdt + 0x18, segment(false, 0));
  memory.store<uint64_t>(kGdt + 0x28, segment(false, 3));
  memory.store<uint64_t>(kGdt + 0x30, segment(true, 3));
  for (int i = 0; i < vcpus; ++i) {
    uint64_t base = kTss + 0x80 * i;
    // 64-bit available TSS descriptor (16 bytes).
    uint64_t low = (kTssSize - 1) | ((base & 0xffffff) << 16) | (0x89ull << 40) | (((base >> 24) & 0xff) << 56);
    memory.store<uint64_t>(kGdt + kTssSelector0 + 16 * i, low);
    memory.store<uint64_t>(kGdt + kTssSelector0 + 16 * i + 8, base >> 32);
    memory.store<uint64_t>(base + 4, interrupt_stack_top(i));  // RSP0
    memory.store<uint16_t>(base + 0x66, kTssSize);             // no I/O bitmap
  }

  for (uint64_t pml4 : {kPml4, kPml4 + 0x1000}) memory.store<uint64_t>(pml4, kPdpt | kTableFlags);
  for (uint64_t gib = 0; gib < 4; ++gib) {
    memory.store<uint64_t>(kPdpt + 8 * gib, (kPd + 0x1000 * gib) | kTableFlags);
    for (uint64_t i = 0; i < 512; ++i) {
      uint64_t phys = (gib << 30) | (i << 21);
      memory.store<uint64_t>(kPd + 0x1000 * gib + 8 * i, phys | kTableFlags | kHuge);
    }
  }
}

kvm_sregs long_mode_sregs(const kvm_sregs& current, int vcpu) {
  kvm_sregs s = current;
  kvm_segment code{};
  code.base = 0;
  code.limit = 0xffffffff;
  code.selector = kKernelCs;
  code.type = 0xb;
  code.present = 1;
  code.s = 1;
  code.l = 1;
  code.g = 1;
  kvm_segment data = code;
  data.selector = kKernelDs;
  data.type = 0x3;
  data.l = 0;
  data.db = 1;
  s.cs = code;
  s.ds = s.es = s.fs = s.gs = s.ss = data;

  s.tr = {};
  s.tr.base = kTss + 0x80 * vcpu;
  s.tr.limit = kTssSize - 1;
  s.tr.selector = kTssSelector0 + 16 * vcpu;
  s.tr.type = 0xb;  // busy 64-bit TSS
  s.tr.present = 1;
  s.ldt = {};
  s.ldt.unusable = 1;
  s.gdt.base = kGdt;
  s.gdt.limit = kGdtLimit;
  s.idt.base = 0;
  s.idt.limit = 0;

  s.cr0 = 0x80050033;  // PG AM WP NE ET MP PE
  s.cr3 = kPml4;
  s.cr4 = 0x20;        // PAE
  s.efer = 0xd01;      // NXE LMA LME SCE
  return s;
}

}  // namespace cellvm::x86
