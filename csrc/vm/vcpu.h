// One vCPU: its KVM fd, its thread's run loop and its exit dispatch.
//
// The loop (Vcpu::run_loop) runs on the vCPU's own thread:
//   KVM_RUN -> dispatch the exit (port I/O, MMIO to a device; anything the
//   VMM cannot continue from stops the machine with a GuestFault) -> if the
//   coordinator has a request (pause, restore, stop), stop at the safe point,
//   where this thread captures or applies its own state.
// Another thread makes it leave KVM_RUN with kick(): immediate_exit plus a
// signal, so the kick also works when the vCPU is blocked in a HALT.
#pragma once

#include <pthread.h>

#include <atomic>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "kvm/kvm.h"
#include "vm/vcpu_state.h"

namespace cellvm {

class Bus;

// What stopped the machine, as seen by the vCPU that stopped it.
struct GuestFault {
  std::string reason;   // "shutdown", "internal-error", "fail-entry", ...
  std::string detail;
  int vcpu = -1;
  std::map<std::string, uint64_t> registers;
};

class VcpuHost {
 public:
  virtual ~VcpuHost() = default;
  virtual const Bus& pio_bus() const = 0;
  virtual const Bus& mmio_bus() const = 0;
  virtual void vcpu_fault(GuestFault fault) = 0;
};

class Vcpu {
 public:
  Vcpu(std::unique_ptr<KvmVcpu> kvm, Backend backend);
  int index() const { return kvm_->index(); }
  KvmVcpu& kvm() { return *kvm_; }

  // Called on this vCPU's thread only.
  VcpuState capture();
  void apply(const VcpuState& state);
  // Runs the guest until stop or fault; `coordinator_*` hooks are the
  // machine's (see Machine::vcpu_thread).
  enum class ExitAction { Continue, Stop };
  ExitAction handle_exit(VcpuHost& host);

  // From any thread: make this vCPU leave KVM_RUN soon.
  void kick();
  void bind_to_current_thread();
  // Blocks this vCPU's thread until the first kick() (restore start gate).
  void wait_for_kick() { kicked_.wait(false); }

  std::map<std::string, uint64_t> registers() const;

 private:
  void complete_pending_io();

  std::unique_ptr<KvmVcpu> kvm_;
  Backend backend_;
  std::vector<uint32_t> saved_msrs_;
  std::atomic<pthread_t> thread_{};
  std::atomic<bool> has_thread_{false};
  std::atomic<bool> kicked_{false};
  bool io_pending_ = false;  // last exit was I/O or MMIO: KVM must finish it before a capture
};

// The signal kick() sends; its handler does nothing but interrupt KVM_RUN.
int kick_signal();

}  // namespace cellvm
