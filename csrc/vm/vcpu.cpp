#include "vm/vcpu.h"

#include <signal.h>

#include <cstring>
#include <mutex>

#include "common/errors.h"
#include "devices/device.h"

namespace cellvm {

namespace {

void on_kick(int) {}  // only there so the signal interrupts KVM_RUN

std::string hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

}  // namespace

int kick_signal() {
  static std::once_flag once;
  static int signo = SIGRTMIN + 3;
  std::call_once(once, [] {
    struct sigaction action {};
    action.sa_handler = on_kick;  // no SA_RESTART: KVM_RUN must return EINTR
    sigemptyset(&action.sa_mask);
    if (::sigaction(signo, &action, nullptr) < 0) throw HypervisorError::from_errno("sigaction(kick)");
  });
  return signo;
}

Vcpu::Vcpu(std::unique_ptr<KvmVcpu> kvm, Backend backend) : kvm_(std::move(kvm)), backend_(backend) {
  saved_msrs_ = Kvm::instance().msr_index_list();
  // KVM_GET_MSR_INDEX_LIST omits this host's PVM state: the native-mode
  // switch (vif page | flags). Without it a restored vCPU starts emulated.
  if (backend_ == Backend::Pvm) saved_msrs_.push_back(kMsrPvmNative);
}

void Vcpu::bind_to_current_thread() {
  kick_signal();
  thread_.store(pthread_self());
  has_thread_.store(true);
}

void Vcpu::kick() {
  __atomic_store_n(&kvm_->run_area()->immediate_exit, 1, __ATOMIC_SEQ_CST);
  if (has_thread_.load()) pthread_kill(thread_.load(), kick_signal());
  kicked_.store(true);
  kicked_.notify_all();
}

void Vcpu::complete_pending_io() {
  // After an I/O or MMIO exit the instruction completes on the next KVM_RUN;
  // run once with immediate_exit so the captured state is past it.
  if (!io_pending_) return;
  kvm_run* run = kvm_->run_area();
  __atomic_store_n(&run->immediate_exit, 1, __ATOMIC_SEQ_CST);
  kvm_->run();
  __atomic_store_n(&run->immediate_exit, 0, __ATOMIC_SEQ_CST);
  io_pending_ = false;
}

VcpuState Vcpu::capture() {
  complete_pending_io();
  VcpuState s;
  s.regs = kvm_->get_regs();
  s.sregs = kvm_->get_sregs();
  s.msrs = kvm_->get_msrs(saved_msrs_);
  s.xsave = kvm_->get_xsave();
  s.xcrs = kvm_->get_xcrs();
  s.lapic = kvm_->get_lapic();
  s.events = kvm_->get_events();
  s.mp_state = kvm_->get_mp_state();
  s.debugregs = kvm_->get_debugregs();
  return s;
}

void Vcpu::apply(const VcpuState& s) {
  kvm_->set_sregs(s.sregs);
  kvm_->set_regs(s.regs);
  kvm_->set_xsave(s.xsave);
  kvm_->set_xcrs(s.xcrs);
  kvm_->set_debugregs(s.debugregs);
  kvm_->set_lapic(s.lapic);
  // The PVM native-mode MSR goes last: once it is set the vCPU enters native
  // mode at its next KVM_RUN, so everything else must already be in place.
  std::vector<kvm_msr_entry> msrs, pvm;
  for (const kvm_msr_entry& e : s.msrs) (e.index == kMsrPvmNative ? pvm : msrs).push_back(e);
  kvm_->set_msrs(msrs);
  if (!pvm.empty()) kvm_->set_msrs(pvm);
  kvm_->set_mp_state(s.mp_state.mp_state);
  kvm_->set_events(s.events);
  io_pending_ = false;
}

std::map<std::string, uint64_t> Vcpu::registers() const {
  kvm_regs r = kvm_->get_regs();
  kvm_sregs s = kvm_->get_sregs();
  return {{"rax", r.rax}, {"rbx", r.rbx}, {"rcx", r.rcx}, {"rdx", r.rdx}, {"rsi", r.rsi},
          {"rdi", r.rdi}, {"rsp", r.rsp}, {"rbp", r.rbp}, {"r8", r.r8},   {"r9", r.r9},
          {"r10", r.r10}, {"r11", r.r11}, {"r12", r.r12}, {"r13", r.r13}, {"r14", r.r14},
          {"r15", r.r15}, {"rip", r.rip}, {"rflags", r.rflags}, {"cs", s.cs.selector},
          {"cr0", s.cr0}, {"cr2", s.cr2}, {"cr3", s.cr3}, {"cr4", s.cr4}, {"efer", s.efer}};
}

Vcpu::ExitAction Vcpu::handle_exit(VcpuHost& host) {
  kvm_run* run = kvm_->run_area();
  auto fault = [&](std::string reason, std::string detail) {
    host.vcpu_fault({std::move(reason), std::move(detail), index(), registers()});
    return ExitAction::Stop;
  };
  switch (run->exit_reason) {
    case KVM_EXIT_IO: {
      io_pending_ = true;
      auto* data = reinterpret_cast<uint8_t*>(run) + run->io.data_offset;
      uint64_t offset = 0;
      Device* device = host.pio_bus().find(run->io.port, &offset);
      for (uint32_t i = 0; i < run->io.count; ++i, data += run->io.size) {
        if (run->io.direction == KVM_EXIT_IO_OUT) {
          if (device) device->write(offset, data, run->io.size, index());
        } else if (device) {
          device->read(offset, data, run->io.size, index());
        } else {
          std::memset(data, 0xff, run->io.size);  // an empty ISA port floats high
        }
      }
      return ExitAction::Continue;
    }
    case KVM_EXIT_MMIO: {
      io_pending_ = true;
      uint64_t offset = 0;
      Device* device = host.mmio_bus().find(run->mmio.phys_addr, &offset);
      uint32_t len = std::min<uint32_t>(run->mmio.len, sizeof run->mmio.data);
      if (run->mmio.is_write) {
        if (device) device->write(offset, run->mmio.data, len, index());
      } else if (device) {
        device->read(offset, run->mmio.data, len, index());
      } else {
        std::memset(run->mmio.data, 0, len);
      }
      return ExitAction::Continue;
    }
    case KVM_EXIT_IRQ_WINDOW_OPEN:
    case KVM_EXIT_INTR:
      return ExitAction::Continue;
    case KVM_EXIT_HLT:
      return fault("hlt", "the vCPU halted with interrupts it can never get");
    case KVM_EXIT_SHUTDOWN:
      return fault("shutdown", "triple fault (KVM_EXIT_SHUTDOWN)");
    case KVM_EXIT_INTERNAL_ERROR:
      return fault("internal-error", "KVM internal error, suberror " + std::to_string(run->internal.suberror) +
                                         " (see dmesg for what the hypervisor rejected)");
    case KVM_EXIT_FAIL_ENTRY:
      return fault("fail-entry", "VM entry failed, hardware reason " +
                                     hex(run->fail_entry.hardware_entry_failure_reason));
    case KVM_EXIT_SYSTEM_EVENT:
      return fault("system-event", "system event " + std::to_string(run->system_event.type));
    default:
      return fault("unhandled-exit", "unhandled KVM exit reason " + std::to_string(run->exit_reason));
  }
}

}  // namespace cellvm
