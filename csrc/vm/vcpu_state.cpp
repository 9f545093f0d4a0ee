#include "vm/vcpu_state.h"

#include <cstring>

namespace cellvm {

namespace {
constexpr uint32_t kVcpuStateVersion = 1;
}

Blob VcpuState::serialize() const {
  BlobWriter w;
  w.pod(kVcpuStateVersion);
  w.sized(&regs, sizeof regs).sized(&sregs, sizeof sregs);
  w.sized(msrs.data(), msrs.size() * sizeof(kvm_msr_entry));
  w.sized(xsave.data(), xsave.size());
  w.sized(&xcrs, sizeof xcrs).sized(&lapic, sizeof lapic).sized(&events, sizeof events);
  w.sized(&mp_state, sizeof mp_state).sized(&debugregs, sizeof debugregs);
  return w.take();
}

VcpuState VcpuState::deserialize(const Blob& blob, const std::string& what) {
  BlobReader r(blob, what);
  if (uint32_t version = r.pod<uint32_t>(); version != kVcpuStateVersion)
    throw SnapshotIncompatibleError(what + ": vCPU state version " + std::to_string(version));
  VcpuState s;
  r.sized_exact(&s.regs, sizeof s.regs);
  r.sized_exact(&s.sregs, sizeof s.sregs);
  Blob msrs = r.sized();
  if (msrs.size() % sizeof(kvm_msr_entry) != 0) throw SnapshotCorruptError(what + ": MSR record size");
  s.msrs.resize(msrs.size() / sizeof(kvm_msr_entry));
  std::memcpy(s.msrs.data(), msrs.data(), msrs.size());
  s.xsave = r.sized();
  r.sized_exact(&s.xcrs, sizeof s.xcrs);
  r.sized_exact(&s.lapic, sizeof s.lapic);
  r.sized_exact(&s.events, sizeof s.events);
  r.sized_exact(&s.mp_state, sizeof s.mp_state);
  r.sized_exact(&s.debugregs, sizeof s.debugregs);
  r.expect_end();
  return s;
}

}  // namespace cellvm
