// A whole microVM: the KVM VM, guest memory, devices on their buses, one
// thread per vCPU under the coordinator. Python drives it through
// bindings.cpp (cellvm._core.Machine).
//
// Lifecycle: construct (VM, memory, irqchip, vCPUs) -> load a guest ->
// start() (vCPU threads run) -> pause()/resume() any number of times ->
// the guest exits, faults, or close() stops it. wait() reports which.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "devices/device.h"
#include "devices/i8042.h"
#include "devices/power_port.h"
#include "devices/virtio/mmio.h"
#include "devices/serial.h"
#include "devices/testdev.h"
#include "kvm/kvm.h"
#include "vm/console.h"
#include "vm/coordinator.h"
#include "vm/event_loop.h"
#include "vm/memory.h"
#include "vm/vcpu.h"

namespace cellvm {

// KVM_GET_SUPPORTED_CPUID as the guest gets it: unchanged but for the APIC
// ID fields, which KVM fills with the host CPU that answered the ioctl and
// we set to the vCPU's index, so CPUID agrees with the vCPU's LAPIC.
std::vector<kvm_cpuid_entry2> guest_cpuid(int vcpu);

struct MachineConfig {
  uint64_t memory_bytes = 64ull << 20;
  int vcpus = 1;
};

// A device to attach before loading the guest (and again, the same list,
// when restoring a snapshot of that machine).
struct DeviceSpec {
  enum class Kind { Console, Block, Rng };
  Kind kind;
  std::string path;        // Block: the disk image
  bool read_only = true;   // Block
};

// Steady-clock stamps of one restore, by phase, for Machine::restore_phases()
// (a handful of clock reads, ~25 ns each: cheap enough to keep always on).
class PhaseClock {
 public:
  using Clock = std::chrono::steady_clock;
  PhaseClock() { stamp("start"); }
  void stamp(const char* phase) { stamps_.emplace_back(phase, Clock::now()); }
  Clock::time_point start() const { return stamps_.front().second; }
  const std::vector<std::pair<const char*, Clock::time_point>>& stamps() const { return stamps_; }

 private:
  std::vector<std::pair<const char*, Clock::time_point>> stamps_;
};

struct SnapshotStats {
  bool diff = false;  // only pages written since the restore (over the parent's images)
  uint64_t pages_written = 0;
  uint64_t bytes_written = 0;
  double pause_seconds = 0;  // vCPUs parked: from the pause request to the resume
};

class Machine final : public Platform, public VcpuHost {
 public:
  // A new machine; with `memory_layers` its RAM is those snapshot images
  // mapped MAP_PRIVATE (see snapshot/memory_file.h) instead of fresh anonymous memory.
  explicit Machine(MachineConfig config, const std::vector<std::string>& memory_layers = {});

  // A machine prepared ahead of a restore (vm/vm_pool.h): the VM, its
  // memslot, irqchip, vCPUs with CPUID and devices, with its vCPU threads
  // started and waiting for the restore. Its RAM is `memory_layers` mapped
  // MAP_PRIVATE, or, with none, an empty anonymous range the restore maps
  // the snapshot's images over. restore() takes these from the pool.
  // With `state_path` (and layers) the snapshot's state is checked and put in
  // place too: interrupt controllers and devices, and every vCPU's full state,
  // applied by its own thread before it parks. The restore of such a machine
  // sets only the clock and each vCPU's TSC (so guest time continues from the
  // snapshot, not from the prepare) and releases the vCPUs.
  // With `working_set` (and layers): a file of the pages to copy ahead, as
  // resident_pages() writes them (u64 first page, u64 count, little endian,
  // repeated); those pages are made private (MADV_POPULATE_WRITE) before the
  // memslot exists, so the restored guest's first touches of them are shadow
  // faults on present, writable host pages instead of file-page COWs.
  static std::unique_ptr<Machine> prepare(MachineConfig config, const std::vector<std::string>& memory_layers,
                                          const std::string& state_path = {}, const std::string& working_set = {});

  // A running machine continued from a snapshot: state file `state_path`
  // (snapshot/state_file.h), RAM from `memory_layers` (full image, then
  // diffs). Everything is checked before any vCPU runs; every vCPU applies
  // its own state in the coordinator's two-phase rendezvous, then all run.
  static std::unique_ptr<Machine> restore(const std::string& state_path, const std::vector<std::string>& memory_layers,
                                          const std::vector<DeviceSpec>& devices, std::chrono::nanoseconds deadline,
                                          int inject_apply_failure = -1, const std::string& working_set = "");

  // Attaches a virtio-mmio device (before load_linux, which puts every
  // device on the kernel command line). Returns its index.
  int add_device(const DeviceSpec& spec);
  // A new fd for the host end of console device `index` (the caller owns it).
  int console_socket(int index) const;
  // Pauses every vCPU, writes state.bin and memory.bin into `dir` (a diff
  // image if this machine was itself restored), then resumes if `resume`.
  SnapshotStats snapshot(const std::string& dir, std::chrono::nanoseconds deadline, bool resume);
  bool memory_restored() const { return memory_->restored(); }
  // The guest pages resident in this process's mapping of guest RAM (what
  // the guest has touched, plus the file pages' fault-around), as runs
  // (first page, count); with `private_only`, only the pages that are this
  // machine's own copies (written since the restore, or fresh anonymous RAM).
  // /proc/self/pagemap, so not for hot paths.
  std::vector<std::pair<uint64_t, uint64_t>> resident_pages(bool private_only = false) const;
  // Writes resident_pages(true) in the working-set file format of prepare():
  // the pages a restored guest wrote are the ones worth copying ahead.
  void write_working_set(const std::string& path) const;
  // Where the last restore's time went: (phase, its end in seconds after
  // the restore began), in order; "start" is 0. See machine_snapshot.cpp.
  // Empty for a machine that was not restored.
  std::vector<std::pair<std::string, double>> restore_phases() const;
  // The restore's start on the steady clock (time.monotonic() in Python).
  double restore_started() const;
  ~Machine() override;
  Machine(const Machine&) = delete;
  Machine& operator=(const Machine&) = delete;

  const MachineConfig& config() const { return config_; }
  Backend backend() const { return backend_; }
  GuestMemory& memory() { return *memory_; }
  uint64_t tsc_khz() const { return vm_.tsc_khz(); }

  // Loads a test guest ELF (guest/testguests) and points every vCPU at its
  // entry: RDI = vCPU index, RSI = parameter page, RSP = its kernel stack.
  void load_test_guest(const std::string& elf_path, const std::vector<uint64_t>& params);
  // Loads vmlinux (+ initrd) for the 64-bit boot protocol (linux_boot.h).
  // vCPU 0 starts at startup_64; the others wait for the guest's INIT/SIPI.
  void load_linux(const std::string& vmlinux, const std::string& initrd, const std::string& cmdline);

  void start();
  // The guest's exit code once it stopped the machine; nullopt if `timeout`
  // passed first. Throws GuestCrashed if a vCPU faulted.
  std::optional<int64_t> wait(std::chrono::nanoseconds timeout);
  bool stopped() const;

  // Every vCPU's state by index (nullopt: that vCPU is not running).
  std::vector<std::optional<VcpuState>> pause(std::chrono::nanoseconds deadline);
  void resume();
  void close();

  std::string console() const { return console_.text(); }
  std::vector<TestDevice::Report> reports() const { return testdev_.reports(); }
  std::vector<TestDevice::Mark> marks() const { return testdev_.marks(); }
  std::vector<std::pair<std::string, uint64_t>> vcpu_stats(int vcpu) const;

  // Platform, VcpuHost: called from vCPU threads.
  void set_irq_line(uint32_t irq, bool level) override { vm_.irq_line(irq, level); }
  void guest_exit(int64_t code) override;
  void console_output(const uint8_t* data, size_t len) override { console_.append(data, len); }
  const Bus& pio_bus() const override { return pio_bus_; }
  const Bus& mmio_bus() const override { return mmio_bus_; }
  std::string device_cmdline() const;
  void vcpu_fault(GuestFault fault) override;

 private:
  Machine(MachineConfig config, GuestMemory memory, PhaseClock* clock);
  static void check_config(const MachineConfig& config);
  static void prefetch_working_set(GuestMemory& memory, const std::string& path,
                                   const std::vector<std::string>& layers);
  std::function<bool(uint64_t)> unchanged_copies() const;
  void vcpu_thread(int index, bool wait_for_request);
  void spawn_vcpu_threads(bool wait_for_request);
  void restore_state(const StateFile& state);  // VM-wide and device state, then threads at the gate
  void restore_vm_state(const StateFile& state, bool with_clock);  // interrupt controllers, clock, devices
  void prestate(const std::string& state_path);  // prepare() with a state: before the threads start
  static std::unique_ptr<Machine> finish_prestated_restore(std::unique_ptr<Machine> machine, PhaseClock clock,
                                                          std::chrono::nanoseconds deadline, int inject_apply_failure);
  void request_stop();
  void check_open() const;

  MachineConfig config_;
  KvmVm vm_;
  Backend backend_ = Backend::HardwareKvm;  // set from vCPU 0
  std::unique_ptr<GuestMemory> memory_;
  std::vector<std::unique_ptr<Vcpu>> vcpus_;
  Coordinator<VcpuState> coordinator_;
  Console console_;
  Serial serial_{*this};
  TestDevice testdev_{*this};
  I8042 i8042_{*this};
  PowerPort power_{*this};
  Bus pio_bus_, mmio_bus_;
  std::vector<Device*> devices_;
  EventLoop loop_;
  std::vector<std::unique_ptr<VirtioTransport>> virtio_;
  std::map<int, UniqueFd> console_host_ends_;  // device index -> the host end of its socketpair
  int inject_apply_failure_ = -1;  // tests: this vCPU's apply throws, as a broken state would
  // prepare() with a state: what the vCPUs apply at the gate and what the
  // restore sets again (clock, TSCs); prestated_ switches the restore's apply
  // to TSC only. Written before the threads start or under the coordinator.
  std::vector<std::optional<VcpuState>> prestate_targets_;
  std::vector<std::string> prestate_errors_;  // by vCPU, written by its thread before at_gate
  kvm_clock_data prestate_clock_{};
  std::atomic<bool> prestated_{false};
  std::vector<std::thread> threads_;
  std::optional<PhaseClock> restore_clock_;  // set by restore()
  // Each vCPU's own restore stamps (steady-clock ns), written once by its
  // thread: woken by the restore, state applied, first exit from KVM_RUN
  // (for the test guests: their first MMIO write).
  struct VcpuRestoreStamps {
    std::atomic<int64_t> woke{0}, applied{0}, first_exit{0};
    std::atomic<bool> at_gate{false};  // its thread runs and waits for the restore (prepare())
  };
  std::vector<VcpuRestoreStamps> vcpu_stamps_;

  mutable std::mutex mutex_;  // guards everything below
  std::condition_variable stopped_cv_;
  bool started_ = false, stopping_ = false, closed_ = false;
  std::optional<int64_t> exit_code_;
  std::optional<GuestFault> fault_;
};

}  // namespace cellvm
