// Thin RAII wrappers over the /dev/kvm, VM and vCPU file descriptors.
// Every failing ioctl throws HypervisorError naming the call and errno.
#pragma once

#include "kvm/kvm_uapi.h"

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common/fd.h"

namespace cellvm {

// MSRs of this host's PVM that KVM_GET_MSR_INDEX_LIST omits.
inline constexpr uint32_t kMsrPvmNative = 0x4b564d10;     // vif GPA | 0x400 | flags
inline constexpr uint32_t kMsrPvmSignature = 0x4b564d11;  // reads 0x4d5650 ("PVM")
inline constexpr uint64_t kPvmSignature = 0x4d5650;

enum class Backend { HardwareKvm, Pvm };
const char* backend_name(Backend b);

// The system fd: capabilities and host-wide tables, read once per process.
class Kvm {
 public:
  static const Kvm& instance();  // opens /dev/kvm on first use
  int fd() const { return fd_.get(); }
  int check_extension(long cap) const;
  size_t vcpu_mmap_size() const { return vcpu_mmap_size_; }
  // KVM_GET_SUPPORTED_CPUID, passed to every vCPU unchanged.
  const std::vector<kvm_cpuid_entry2>& supported_cpuid() const { return cpuid_; }
  // KVM_GET_MSR_INDEX_LIST; the MSRs a snapshot saves (see Vcpu::saved_msrs).
  const std::vector<uint32_t>& msr_index_list() const { return msr_list_; }
  // PVM or hardware KVM, detected once per process by reading the PVM
  // signature MSR (it reads "PVM" only on kvm-pvm) from `vcpu_fd`, or from
  // a scratch VM when no vCPU is at hand (about 1 ms: avoided on the first
  // machine's path by passing its vCPU 0).
  Backend backend(int vcpu_fd = -1) const;

 private:
  Kvm();
  UniqueFd fd_;
  size_t vcpu_mmap_size_ = 0;
  std::vector<kvm_cpuid_entry2> cpuid_;
  std::vector<uint32_t> msr_list_;
  mutable std::once_flag backend_once_;
  mutable Backend backend_ = Backend::HardwareKvm;
};

class KvmVcpu;

class KvmVm {
 public:
  KvmVm();
  int fd() const { return fd_.get(); }
  void set_memory_region(uint32_t slot, uint64_t gpa, uint64_t size, void* host, uint32_t flags = 0);
  void create_irqchip();
  void create_pit();
  void set_tss_addr(uint64_t gpa);
  void set_identity_map_addr(uint64_t gpa);
  void irq_line(uint32_t irq, bool level);
  kvm_irqchip get_irqchip(uint32_t chip_id) const;  // KVM_IRQCHIP_PIC_MASTER, _SLAVE, _IOAPIC
  void set_irqchip(const kvm_irqchip& chip);
  kvm_clock_data get_clock() const;
  void set_clock(const kvm_clock_data& clock);
  uint64_t tsc_khz() const;
  std::unique_ptr<KvmVcpu> create_vcpu(int index);
  void close() { fd_.reset(); }  // the VM goes once its vCPU fds are closed too

 private:
  UniqueFd fd_;
};

// Binary stats (KVM_GET_STATS_FD) of one vCPU, looked up by name.
class VcpuStats {
 public:
  explicit VcpuStats(int vcpu_fd);
  uint64_t read(const std::string& name) const;  // 0 if the host has no such stat
  std::vector<std::pair<std::string, uint64_t>> read_all() const;

 private:
  UniqueFd fd_;
  struct Desc {
    std::string name;
    uint32_t offset;  // from the start of the data block
    uint32_t size;    // in u64 words
  };
  std::vector<Desc> descs_;
  uint32_t data_offset_ = 0;
};

class KvmVcpu {
 public:
  KvmVcpu(int index, UniqueFd fd);
  int index() const { return index_; }
  int fd() const { return fd_.get(); }
  kvm_run* run_area() const { return run_.as<kvm_run>(); }

  // One KVM_RUN. Returns false if interrupted (EINTR / immediate_exit).
  bool run();

  kvm_regs get_regs() const;
  void set_regs(const kvm_regs& regs);
  kvm_sregs get_sregs() const;
  void set_sregs(const kvm_sregs& sregs);
  void set_cpuid(const std::vector<kvm_cpuid_entry2>& entries);
  // Reads `indices`; entries the host refuses are left out of the result.
  std::vector<kvm_msr_entry> get_msrs(const std::vector<uint32_t>& indices) const;
  void set_msrs(const std::vector<kvm_msr_entry>& msrs);
  std::vector<uint8_t> get_xsave() const;  // KVM_GET_XSAVE2 sized by KVM_CAP_XSAVE2
  void set_xsave(const std::vector<uint8_t>& xsave);
  kvm_xcrs get_xcrs() const;
  void set_xcrs(const kvm_xcrs& xcrs);
  kvm_lapic_state get_lapic() const;
  void set_lapic(const kvm_lapic_state& lapic);
  kvm_vcpu_events get_events() const;
  void set_events(const kvm_vcpu_events& events);
  kvm_mp_state get_mp_state() const;
  void set_mp_state(uint32_t state);
  kvm_debugregs get_debugregs() const;
  void set_debugregs(const kvm_debugregs& regs);
  const VcpuStats& stats() const;

 private:
  int index_;
  UniqueFd fd_;
  Mapping run_;
  mutable std::unique_ptr<VcpuStats> stats_;
};

}  // namespace cellvm
