#include "vm/machine.h"

#include <fcntl.h>
#include <sys/socket.h>

#include <stdexcept>

#include "common/errors.h"
#include "devices/virtio_blk.h"
#include "devices/virtio_console.h"
#include "devices/virtio_rng.h"
#include "snapshot/memory_file.h"
#include "vm/elf.h"
#include "vm/linux_boot.h"
#include "vm/x86_boot.h"

namespace cellvm {

namespace {

constexpr uint64_t kMmioHoleStart = 0xc0000000;  // devices live above 3 GiB
constexpr uint64_t kIdentityMapAddr = 0xfeffc000;  // hardware KVM (VMX) scratch pages
constexpr uint64_t kTssAddr = 0xfeffd000;
constexpr size_t kConsoleTailForErrors = 4096;

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace

void Machine::check_config(const MachineConfig& config) {
  if (config.vcpus < 1 || config.vcpus > x86::kMaxVcpus)
    throw std::invalid_argument("vcpus must be between 1 and " + std::to_string(x86::kMaxVcpus));
  if (config.memory_bytes < (16ull << 20) || config.memory_bytes > kMmioHoleStart)
    throw std::invalid_argument("memory must be between 16 MiB and 3 GiB");
  if (config.memory_bytes % (2ull << 20) != 0) throw std::invalid_argument("memory must be a multiple of 2 MiB");
}

namespace {
GuestMemory memory_for(const MachineConfig& config, const std::vector<std::string>& memory_layers) {
  if (memory_layers.empty()) return GuestMemory(config.memory_bytes);
  return GuestMemory(map_memory_layers(memory_layers, config.memory_bytes));
}
}  // namespace

std::vector<kvm_cpuid_entry2> guest_cpuid(int vcpu) {
  std::vector<kvm_cpuid_entry2> entries = Kvm::instance().supported_cpuid();
  for (kvm_cpuid_entry2& e : entries) {
    if (e.function == 1) e.ebx = (e.ebx & 0x00ffffff) | (uint32_t(vcpu) << 24);
    if (e.function == 0xb || e.function == 0x1f) e.edx = vcpu;
  }
  return entries;
}

Machine::Machine(MachineConfig config, const std::vector<std::string>& memory_layers)
    : Machine((check_config(config), config), memory_for(config, memory_layers), nullptr) {}

std::unique_ptr<Machine> Machine::prepare(MachineConfig config, const std::vector<std::string>& memory_layers,
                                          const std::string& state_path, const std::string& working_set) {
  check_config(config);
  if (!state_path.empty() && memory_layers.empty())
    throw std::invalid_argument("a machine prepared with a state needs its memory images too");
  GuestMemory memory = memory_layers.empty() ? GuestMemory::reserved(config.memory_bytes)
                                             : GuestMemory(map_memory_layers(memory_layers, config.memory_bytes));
  // Before the memslot: copying pages under a registered slot would make
  // KVM's MMU notifier run for every one of them.
  if (!working_set.empty() && !memory_layers.empty()) prefetch_working_set(memory, working_set, memory_layers);
  std::unique_ptr<Machine> machine(new Machine(config, std::move(memory), nullptr));
  if (!state_path.empty()) machine->prestate(state_path);
  {
    std::lock_guard lock(machine->mutex_);
    machine->spawn_vcpu_threads(true);  // they wait for the restore's first kick
  }
  // Ready only once every vCPU thread has run and sleeps at the gate: a new
  // thread on a busy host can wait milliseconds for its first time slice,
  // a sleeping one is woken within tens of microseconds.
  for (auto& stamps : machine->vcpu_stamps_) stamps.at_gate.wait(false);
  for (size_t i = 0; i < machine->prestate_errors_.size(); ++i)
    if (!machine->prestate_errors_[i].empty())
      throw HypervisorError("preparing vCPU " + std::to_string(i) + " for a restore: " + machine->prestate_errors_[i]);
  return machine;
}

Machine::Machine(MachineConfig config, GuestMemory memory, PhaseClock* clock)
    : config_(config),
      memory_(std::make_unique<GuestMemory>(std::move(memory))),
      coordinator_(config.vcpus),
      vcpu_stamps_(config.vcpus) {
  if (clock) clock->stamp("vm_create");
  // Hardware KVM (VMX) needs these scratch pages; PVM accepts and ignores
  // them, so set them before we know which one this is.
  vm_.set_tss_addr(kTssAddr);
  vm_.set_identity_map_addr(kIdentityMapAddr);
  // Memory slots before the irqchip: on PVM a slot added after
  // KVM_CREATE_IRQCHIP costs ~10 ms instead of ~50 us (PVM-HOST-FACTS.md).
  vm_.set_memory_region(0, 0, memory_->size(), memory_->host());
  if (clock) clock->stamp("memslot");
  vm_.create_irqchip();
  if (clock) clock->stamp("irqchip");
  for (int i = 0; i < config.vcpus; ++i) {
    std::unique_ptr<KvmVcpu> kvm_vcpu = vm_.create_vcpu(i);
    if (i == 0) backend_ = Kvm::instance().backend(kvm_vcpu->fd());  // probed once per process
    auto vcpu = std::make_unique<Vcpu>(std::move(kvm_vcpu), backend_);
    vcpu->kvm().set_cpuid(guest_cpuid(i));
    vcpus_.push_back(std::move(vcpu));
  }
  if (clock) clock->stamp("vcpus_cpuid");

  pio_bus_.add(Serial::kBase, 8, &serial_);
  pio_bus_.add(I8042::kDataPort, I8042::kCommandPort - I8042::kDataPort + 1, &i8042_);
  pio_bus_.add(PowerPort::kPort, 1, &power_);
  mmio_bus_.add(TestDevice::kBase, TestDevice::kSize, &testdev_);
  devices_ = {&serial_, &i8042_, &power_, &testdev_};
}

Machine::~Machine() { close(); }

void Machine::check_open() const {
  if (closed_) throw MachineClosedError();
}

void Machine::load_test_guest(const std::string& elf_path, const std::vector<uint64_t>& params) {
  std::lock_guard lock(mutex_);
  check_open();
  if (started_) throw std::logic_error("load_test_guest() after start()");
  if (params.size() > 512) throw std::invalid_argument("at most 512 parameter words");
  x86::write_boot_tables(*memory_, config_.vcpus);
  for (size_t i = 0; i < params.size(); ++i) memory_->store<uint64_t>(x86::kParams + 8 * i, params[i]);
  LoadedElf elf = load_elf(*memory_, elf_path);
  for (auto& vcpu : vcpus_) {
    int i = vcpu->index();
    KvmVcpu& kvm = vcpu->kvm();
    kvm.set_sregs(x86::long_mode_sregs(kvm.get_sregs(), i));
    kvm_regs regs{};
    regs.rip = elf.entry;
    regs.rsp = x86::kernel_stack_top(i);
    regs.rdi = i;
    regs.rsi = x86::kParams;
    regs.rflags = 0x2;
    kvm.set_regs(regs);
    // Secondary vCPUs would wait for INIT/SIPI; test guests start them all at the entry.
    kvm.set_mp_state(KVM_MP_STATE_RUNNABLE);
  }
}

void Machine::load_linux(const std::string& vmlinux, const std::string& initrd, const std::string& cmdline) {
  std::lock_guard lock(mutex_);
  check_open();
  if (started_) throw std::logic_error("load_linux() after start()");
  std::string full_cmdline = cmdline;
  std::string devices = device_cmdline();
  if (!devices.empty()) full_cmdline += (full_cmdline.empty() ? "" : " ") + devices;
  LinuxBootInfo boot = cellvm::load_linux(*memory_, config_.vcpus, vmlinux, initrd, full_cmdline);
  KvmVcpu& bsp = vcpus_[0]->kvm();
  bsp.set_sregs(x86::long_mode_sregs(bsp.get_sregs(), 0));
  kvm_regs regs{};
  regs.rip = boot.entry;
  regs.rsi = boot.boot_params;
  regs.rsp = x86::kernel_stack_top(0);
  regs.rflags = 0x2;
  bsp.set_regs(regs);
}

int Machine::add_device(const DeviceSpec& spec) {
  std::lock_guard lock(mutex_);
  check_open();
  if (started_) throw std::logic_error("add_device() after start()");
  constexpr uint64_t kFirstBase = TestDevice::kBase + TestDevice::kSize;
  constexpr uint32_t kFirstIrq = 5;  // after COM1's 4
  constexpr size_t kMaxDevices = 16;
  if (virtio_.size() >= kMaxDevices) throw std::invalid_argument("at most 16 virtio devices");
  int index = static_cast<int>(virtio_.size());
  std::unique_ptr<VirtioDevice> device;
  switch (spec.kind) {
    case DeviceSpec::Kind::Block: device = std::make_unique<VirtioBlk>(spec.path, spec.read_only); break;
    case DeviceSpec::Kind::Rng: device = std::make_unique<VirtioRng>(); break;
    case DeviceSpec::Kind::Console: {
      int fds[2];
      if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) < 0) throw HypervisorError::from_errno("socketpair");
      console_host_ends_[index] = UniqueFd(fds[1]);
      device = std::make_unique<VirtioConsole>(UniqueFd(fds[0]), loop_);
      break;
    }
  }
  auto transport = std::make_unique<VirtioTransport>(*this, *memory_, std::move(device),
                                                     kFirstBase + VirtioTransport::kWindow * index, kFirstIrq + index);
  mmio_bus_.add(transport->base(), VirtioTransport::kWindow, transport.get());
  devices_.push_back(transport.get());
  virtio_.push_back(std::move(transport));
  return index;
}

int Machine::console_socket(int index) const {
  std::lock_guard lock(mutex_);
  check_open();
  auto it = console_host_ends_.find(index);
  if (it == console_host_ends_.end()) throw std::out_of_range("device " + std::to_string(index) + " is not a console");
  int fd = ::fcntl(it->second.get(), F_DUPFD_CLOEXEC, 0);
  if (fd < 0) throw HypervisorError::from_errno("dup(console socket)");
  return fd;
}

std::string Machine::device_cmdline() const {
  std::string out;
  for (const auto& t : virtio_) out += (out.empty() ? "" : " ") + t->cmdline_fragment();
  return out;
}

void Machine::start() {
  std::lock_guard lock(mutex_);
  check_open();
  if (started_) throw std::logic_error("the machine is already started");
  started_ = true;
  loop_.start();
  spawn_vcpu_threads(false);
}

void Machine::spawn_vcpu_threads(bool wait_for_request) {
  for (auto& vcpu : vcpus_) {
    Vcpu* v = vcpu.get();
    coordinator_.set_kick(v->index(), [v] { v->kick(); });
  }
  for (auto& vcpu : vcpus_) threads_.emplace_back(&Machine::vcpu_thread, this, vcpu->index(), wait_for_request);
}

void Machine::vcpu_thread(int index, bool wait_for_request) {
  Vcpu& vcpu = *vcpus_[index];
  vcpu.bind_to_current_thread();
  coordinator_.attach(index);
  // A restored machine's threads must not enter the guest before the
  // restore request has reached them: they wait for its first kick.
  // A restore that is already under way when this thread attaches kicked
  // nobody (the coordinator only kicks attached vCPUs, then again every
  // kick_interval = 1 ms): it must not wait for a kick then.
  if (wait_for_request) {
    if (prestated_ && prestate_targets_[index]) {
      try {
        vcpu.apply(*prestate_targets_[index]);  // its own state, on its own thread, before anything runs
      } catch (const std::exception& e) {
        prestate_errors_[index] = e.what();
      }
    }
    vcpu_stamps_[index].at_gate.store(true);
    vcpu_stamps_[index].at_gate.notify_all();
    if (!coordinator_.has_request()) vcpu.wait_for_kick();
    vcpu_stamps_[index].woke.store(now_ns());
  }
  kvm_run* run = vcpu.kvm().run_area();
  auto capture = [&vcpu] { return vcpu.capture(); };
  auto apply = [this, &vcpu](const VcpuState& state) {
    if (vcpu.index() == inject_apply_failure_) throw HypervisorError("injected failure applying vCPU state");
    if (prestated_) {  // the rest is in place since prepare(): only the TSC, so guest time continues from the snapshot
      constexpr uint32_t kMsrTsc = 0x10;
      for (const kvm_msr_entry& e : state.msrs)
        if (e.index == kMsrTsc) vcpu.kvm().set_msrs({e});
      vcpu_stamps_[vcpu.index()].applied.store(now_ns());
      return;
    }
    vcpu.apply(state);
    vcpu_stamps_[vcpu.index()].applied.store(now_ns());
  };
  bool first_exit = wait_for_request;  // a restored vCPU stamps its first exit (restore_phases)
  try {
    while (true) {
      if (coordinator_.has_request()) {
        if (coordinator_.safe_point(index, capture, apply) == Coordinator<VcpuState>::Next::Stop) break;
        continue;
      }
      bool exited = vcpu.kvm().run();
      __atomic_store_n(&run->immediate_exit, 0, __ATOMIC_SEQ_CST);
      if (!exited) continue;  // kicked: look at the coordinator's request
      if (first_exit) {
        first_exit = false;
        vcpu_stamps_[index].first_exit.store(now_ns());
      }
      if (vcpu.handle_exit(*this) == Vcpu::ExitAction::Stop) break;
    }
  } catch (const std::exception& e) {
    vcpu_fault({"vmm-error", e.what(), index, {}});
  }
  coordinator_.detach(index);
}

void Machine::guest_exit(int64_t code) {
  {
    std::lock_guard lock(mutex_);
    if (!exit_code_ && !fault_) exit_code_ = code;
  }
  request_stop();
}

void Machine::vcpu_fault(GuestFault fault) {
  {
    std::lock_guard lock(mutex_);
    if (!exit_code_ && !fault_) fault_ = std::move(fault);
  }
  request_stop();
}

void Machine::request_stop() {
  {
    std::lock_guard lock(mutex_);
    if (stopping_) return;
    stopping_ = true;
  }
  coordinator_.shutdown();
  for (auto& vcpu : vcpus_) vcpu->kick();
  // The host side of every console sees EOF at once (the SDK's dups share
  // the socket), so a client waiting on the agent learns the VM is gone.
  for (auto& [index, host_end] : console_host_ends_) ::shutdown(host_end.get(), SHUT_RDWR);
  stopped_cv_.notify_all();
}

bool Machine::stopped() const {
  std::lock_guard lock(mutex_);
  return stopping_;
}

std::optional<int64_t> Machine::wait(std::chrono::nanoseconds timeout) {
  std::unique_lock lock(mutex_);
  check_open();
  if (!stopped_cv_.wait_for(lock, timeout, [this] { return stopping_; })) return std::nullopt;
  if (fault_) {
    std::string what = "vCPU " + std::to_string(fault_->vcpu) + ": " + fault_->detail;
    throw GuestCrashed(what, fault_->reason, fault_->vcpu, fault_->registers, console_.tail(kConsoleTailForErrors));
  }
  if (exit_code_) return exit_code_;
  throw MachineClosedError();
}

std::vector<std::optional<VcpuState>> Machine::pause(std::chrono::nanoseconds deadline) {
  {
    std::lock_guard lock(mutex_);
    check_open();
    if (!started_) throw std::logic_error("pause() before start()");
  }
  try {
    return coordinator_.pause(deadline);
  } catch (const DeadlineExceeded& e) {
    throw DeadlineError(e.what(), static_cast<int>(e.vcpu), console_.tail(kConsoleTailForErrors));
  }
}

void Machine::resume() {
  {
    std::lock_guard lock(mutex_);
    check_open();
  }
  coordinator_.resume();
}

void Machine::close() {
  {
    std::lock_guard lock(mutex_);
    if (closed_) return;
  }
  request_stop();
  for (std::thread& t : threads_) t.join();
  threads_.clear();
  loop_.stop();  // before any device goes: its handlers run on the loop thread
  std::lock_guard lock(mutex_);
  closed_ = true;
  // Tearing a VM down takes the kernel up to ~15 ms: do it here, where the
  // binding has released the GIL, not in a destructor that runs under it.
  vcpus_.clear();
  vm_.close();
}

std::vector<std::pair<std::string, uint64_t>> Machine::vcpu_stats(int vcpu) const {
  {
    std::lock_guard lock(mutex_);
    check_open();
  }
  if (vcpu < 0 || vcpu >= static_cast<int>(vcpus_.size())) throw std::out_of_range("no such vCPU");
  return vcpus_[vcpu]->kvm().stats().read_all();
}

}  // namespace cellvm
