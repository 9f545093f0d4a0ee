// The x86-64 state a vCPU starts in. There is no firmware and no real-mode
// boot: the VMM writes a GDT, TSS and identity page tables into guest memory
// and puts every vCPU straight into 64-bit CPL0 with KVM_SET_SREGS. That is
// what this host's PVM supports (PVM-HOST-FACTS.md section 4) and what the
// Linux 64-bit boot protocol expects.
//
// Low guest memory as the VMM lays it out (physical addresses):
//   0x01000  GDT: 0x10 kernel CS, 0x18 kernel DS, 0x2b user DS, 0x33 user CS,
//            0x40 + 16*i the TSS of vCPU i (Linux's selector layout: PVM
//            returns to user mode with CS 0x33 / SS 0x2b)
//   0x03000  TSS of vCPU i at 0x03000 + 0x80*i, RSP0 = interrupt stack top
//   0x05000  test-guest parameters (u64 words)
//   0x08000  kernel PML4; 0x09000 its user twin (PVM's KPTI mode runs user
//            mode on CR3 | 0x1000, so the pair must be 8 KiB aligned)
//   0x0a000  PDPT; 0x0b000-0x0efff four page directories: 0-4 GiB identity,
//            2 MiB pages, P|RW|US on every level (PVM runs the guest kernel
//            at hardware CPL3, so its pages need _PAGE_USER)
//   0x20000  vif page of vCPU i at 0x20000 + 0x1000*i (test guests)
//   0x40000  kernel stack of vCPU i: top at 0x40000 + 0x4000*(i+1)
//   0x80000  interrupt stack of vCPU i: top at 0x80000 + 0x2000*(i+1)
//   0x100000 test guest image
#pragma once

#include "kvm/kvm_uapi.h"

#include <cstdint>

namespace cellvm {

class GuestMemory;

namespace x86 {
inline constexpr uint64_t kGdt = 0x1000;
inline constexpr uint64_t kTss = 0x3000;
inline constexpr uint64_t kParams = 0x5000;
inline constexpr uint64_t kPml4 = 0x8000;
inline constexpr uint64_t kVif = 0x20000;
inline constexpr int kMaxVcpus = 8;
inline constexpr uint16_t kKernelCs = 0x10, kKernelDs = 0x18;

inline uint64_t vif_page(int vcpu) { return kVif + 0x1000 * vcpu; }
inline uint64_t kernel_stack_top(int vcpu) { return 0x40000 + 0x4000 * (vcpu + 1); }
inline uint64_t interrupt_stack_top(int vcpu) { return 0x80000 + 0x2000 * (vcpu + 1); }

// Writes GDT, TSSs and page tables. Memory must be at least 1 MiB.
void write_boot_tables(GuestMemory& memory, int vcpus);
// 64-bit CPL0 with paging on the tables above, for vCPU `vcpu`.
kvm_sregs long_mode_sregs(const kvm_sregs& current, int vcpu);
}  // namespace x86

}  // namespace cellvm
