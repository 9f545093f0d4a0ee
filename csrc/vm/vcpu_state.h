// Everything a vCPU is, as KVM reports it: what a pause returns and what a
// snapshot saves and a restore applies (on the vCPU's own thread).
#pragma once

#include "kvm/kvm_uapi.h"

#include <cstdint>
#include <vector>

#include "snapshot/state_file.h"

namespace cellvm {

struct VcpuState {
  kvm_regs regs{};
  kvm_sregs sregs{};
  std::vector<kvm_msr_entry> msrs;  // the MSR index list + this host's PVM MSR
  std::vector<uint8_t> xsave;
  kvm_xcrs xcrs{};
  kvm_lapic_state lapic{};
  kvm_vcpu_events events{};
  kvm_mp_state mp_state{};
  kvm_debugregs debugregs{};

  // One record each, length-prefixed: a kernel whose structs differ in size
  // gives SnapshotIncompatibleError, never a misread state.
  Blob serialize() const;
  static VcpuState deserialize(const Blob& blob, const std::string& what);
};

}  // namespace cellvm
