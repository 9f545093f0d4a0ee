// Machine::snapshot and Machine::restore: what a whole machine saves, in
// which order it is put back, and why. The file formats are in snapshot/;
// each device saves its own state (Device::save_state).
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <map>
#include <set>

#include "common/errors.h"
#include "snapshot/memory_file.h"
#include "snapshot/state_file.h"
#include "vm/machine.h"
#include "vm/vm_pool.h"

namespace cellvm {

namespace {

constexpr uint32_t kMsrTsc = 0x10;
constexpr uint32_t kIrqChips[] = {KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC};

// The VM shape and the host facts a snapshot is only valid with.
struct MachineRecordV1 {
  uint32_t version;
  uint32_t backend;  // Backend
  uint32_t vcpus;
  uint32_t reserved;
  uint64_t memory_bytes;
  uint64_t cpuid_hash;  // of KVM_GET_SUPPORTED_CPUID: the CPU model the guest saw
};

uint64_t cpuid_hash() {
  const auto cpuid = guest_cpuid(0);  // not the raw list: its APIC IDs vary per host CPU
  return fnv1a(reinterpret_cast<const uint8_t*>(cpuid.data()), cpuid.size() * sizeof(cpuid[0]));
}

std::string vcpu_section(int i) { return "vcpu." + std::to_string(i); }
std::string irqchip_section(uint32_t chip) { return "vm.irqchip." + std::to_string(chip); }

// One TSC for every vCPU: the latest one saved, so guest time never goes
// back and no two vCPUs disagree (KVM matches equal host-initiated TSC
// writes to one offset).
void align_tsc(std::vector<std::optional<VcpuState>>& targets) {
  uint64_t tsc = 0;
  for (auto& t : targets)
    if (t)
      for (auto& m : t->msrs)
        if (m.index == kMsrTsc) tsc = std::max<uint64_t>(tsc, m.data);
  for (auto& t : targets)
    if (t)
      for (auto& m : t->msrs)
        if (m.index == kMsrTsc) m.data = tsc;
}

// A state file read and checked against this host: the machine's shape and
// every vCPU's state, TSCs aligned. Throws the typed snapshot errors.
struct LoadedState {
  StateFile file;
  MachineConfig config;
  std::vector<std::optional<VcpuState>> targets;
};

LoadedState load_state(const std::string& state_path, PhaseClock* clock) {
  LoadedState out{StateFile::read(state_path), {}, {}};
  if (clock) clock->stamp("state_read");
  BlobReader reader(out.file.get("machine"), state_path);
  auto record = reader.pod<MachineRecordV1>();
  reader.expect_end();
  if (record.version != 1) throw SnapshotIncompatibleError("machine record version " + std::to_string(record.version));
  Backend here = Kvm::instance().backend();
  if (record.backend != static_cast<uint32_t>(here))
    throw SnapshotIncompatibleError(std::string("snapshot was taken on ") +
                                    backend_name(static_cast<Backend>(record.backend)) + ", this host is " +
                                    backend_name(here));
  if (record.cpuid_hash != cpuid_hash())
    throw SnapshotIncompatibleError("snapshot was taken on a host with other CPU features (CPUID differs)");

  out.targets.resize(record.vcpus);
  for (uint32_t i = 0; i < record.vcpus; ++i)
    if (out.file.has(vcpu_section(i)))
      out.targets[i] = VcpuState::deserialize(out.file.get(vcpu_section(i)), state_path + " " + vcpu_section(i));
  align_tsc(out.targets);
  out.config = {record.memory_bytes, static_cast<int>(record.vcpus)};
  if (clock) clock->stamp("state_parse");
  return out;
}

}  // namespace

SnapshotStats Machine::snapshot(const std::string& dir, std::chrono::nanoseconds deadline, bool resume) {
  {
    std::lock_guard lock(mutex_);
    check_open();
    if (!started_) throw std::logic_error("snapshot() before start()");
    if (stopping_) throw std::logic_error("cannot snapshot a machine that has stopped");
  }
  auto paused_at = std::chrono::steady_clock::now();
  std::vector<std::optional<VcpuState>> states;
  try {
    states = coordinator_.pause(deadline);
  } catch (const DeadlineExceeded& e) {
    throw DeadlineError(e.what(), static_cast<int>(e.vcpu), console_.tail(4096));
  }

  SnapshotStats stats;
  try {
    StateFile file;
    MachineRecordV1 record{1, static_cast<uint32_t>(backend_), static_cast<uint32_t>(config_.vcpus), 0,
                           config_.memory_bytes, cpuid_hash()};
    file.put("machine", BlobWriter().pod(record).take());
    for (size_t i = 0; i < states.size(); ++i)
      if (states[i]) file.put(vcpu_section(i), states[i]->serialize());
    for (uint32_t chip : kIrqChips) file.put(irqchip_section(chip), BlobWriter().pod(vm_.get_irqchip(chip)).take());
    file.put("vm.clock", BlobWriter().pod(vm_.get_clock()).take());
    for (const Device* device : devices_) file.put("device." + device->name(), device->save_state());

    // The pages /proc/self/pagemap shows present and private: for restored
    // memory those written since the restore (a diff over the images, less
    // the working-set copies still equal to them), for a fresh machine's
    // anonymous memory every page it ever touched (a full image; untouched
    // pages stay holes).
    MemoryWriteStats memory = write_diff_memory(memory_->host(), memory_->size(), dir + "/memory.bin",
                                                memory_->restored() ? unchanged_copies() : nullptr);
    file.write(dir + "/state.bin");
    stats.diff = memory_->restored();
    stats.pages_written = memory.pages_written;
    stats.bytes_written = memory.bytes_written;
  } catch (...) {
    if (resume) coordinator_.resume();
    throw;
  }
  if (resume) coordinator_.resume();
  stats.pause_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - paused_at).count();
  return stats;
}

// Where the time goes is in restore_phases(); BENCHMARKS.md has the figures.
// With a prepared machine from the pool (vm/vm_pool.h) the VM, memslot,
// irqchip, vCPUs and threads already exist, and with one prepared for these
// very images so is the memory mapping: what is left is reading the state,
// setting it and running.
std::unique_ptr<Machine> Machine::restore(const std::string& state_path, const std::vector<std::string>& memory_layers,
                                          const std::vector<DeviceSpec>& devices, std::chrono::nanoseconds deadline,
                                          int inject_apply_failure, const std::string& working_set) {
  PhaseClock clock;
  VmPool& pool = VmPool::instance();
  if (devices.empty()) {
    // A machine prepared with this very state (and images): checked, set and
    // applied already.
    if (std::unique_ptr<Machine> machine = pool.take_prestated(state_path, memory_layers)) {
      clock.stamp("pool_take");
      return finish_prestated_restore(std::move(machine), std::move(clock), deadline, inject_apply_failure);
    }
  }
  LoadedState loaded = load_state(state_path, &clock);
  const StateFile& state = loaded.file;
  std::vector<std::optional<VcpuState>>& targets = loaded.targets;
  MachineConfig config = loaded.config;
  check_config(config);
  std::unique_ptr<Machine> machine = pool.take({config.memory_bytes, config.vcpus, memory_layers});
  if (machine) {
    clock.stamp("pool_take");  // these images, already mapped
  } else if ((machine = pool.take({config.memory_bytes, config.vcpus, {}}))) {
    clock.stamp("pool_take");
    map_memory_layers_over(memory_layers, config.memory_bytes, machine->memory_->host());
    clock.stamp("memory_map");
  } else {
    GuestMemory memory(map_memory_layers(memory_layers, config.memory_bytes));
    clock.stamp("memory_map");
    // As a prepared machine does it ahead (prepare()), here on the restore's
    // own path: copying the pages costs ~1.6 us each, and the guest's first
    // steps then take an eighth of the shadow faults.
    if (!working_set.empty()) {
      prefetch_working_set(memory, working_set, memory_layers);
      clock.stamp("working_set");
    }
    machine.reset(new Machine(config, std::move(memory), &clock));  // stamps vm_create .. vcpus_cpuid
  }
  machine->inject_apply_failure_ = inject_apply_failure;
  for (const DeviceSpec& spec : devices) machine->add_device(spec);
  machine->restore_state(state);
  clock.stamp("vm_state_threads");
  try {
    machine->coordinator_.restore(std::move(targets), deadline);
  } catch (const DeadlineExceeded& e) {
    throw DeadlineError(std::string("restore: ") + e.what(), static_cast<int>(e.vcpu));
  } catch (const VcpuFailed& e) {
    throw DeadlineError(std::string("restore: ") + e.what(), static_cast<int>(e.vcpu));
  }
  clock.stamp("vcpu_apply");
  machine->restore_clock_ = std::move(clock);
  return machine;
}

std::vector<std::pair<std::string, double>> Machine::restore_phases() const {
  std::vector<std::pair<std::string, double>> out;
  if (!restore_clock_) return out;
  auto since = [&](PhaseClock::Clock::time_point t) {
    return std::chrono::duration<double>(t - restore_clock_->start()).count();
  };
  for (const auto& [phase, when] : restore_clock_->stamps()) out.emplace_back(phase, since(when));
  auto add = [&](const char* what, size_t vcpu, int64_t ns) {
    if (ns) out.emplace_back(what + std::to_string(vcpu), since(PhaseClock::Clock::time_point(std::chrono::nanoseconds(ns))));
  };
  for (size_t i = 0; i < vcpu_stamps_.size(); ++i) {
    add("vcpu_woke.", i, vcpu_stamps_[i].woke.load());
    add("vcpu_applied.", i, vcpu_stamps_[i].applied.load());
    add("first_exit.", i, vcpu_stamps_[i].first_exit.load());
  }
  return out;
}

double Machine::restore_started() const {
  if (!restore_clock_) return 0;
  return std::chrono::duration<double>(restore_clock_->start().time_since_epoch()).count();
}

void Machine::restore_state(const StateFile& state) {
  restore_vm_state(state, true);
  std::lock_guard lock(mutex_);
  started_ = true;
  loop_.start();
  if (threads_.empty()) spawn_vcpu_threads(true);  // a prepared machine's wait at the gate already
}

void Machine::restore_vm_state(const StateFile& state, bool with_clock) {
  // VM-wide state first: the interrupt controllers and the clock must be
  // in place before any vCPU runs.
  for (uint32_t chip : kIrqChips) {
    BlobReader r(state.get(irqchip_section(chip)), irqchip_section(chip));
    vm_.set_irqchip(r.pod<kvm_irqchip>());
    r.expect_end();
  }
  BlobReader clock(state.get("vm.clock"), "vm.clock");
  auto clock_data = clock.pod<kvm_clock_data>();
  clock.expect_end();
  if (with_clock) vm_.set_clock(clock_data);
  prestate_clock_ = clock_data;
  for (Device* device : devices_) {
    std::string name = "device." + device->name();
    if (state.has(name)) {
      device->restore_state(state.get(name));
    } else if (dynamic_cast<VirtioTransport*>(device)) {
      throw SnapshotIncompatibleError("snapshot has no state for " + device->name() + ": restore with the same devices");
    }
  }
}

void Machine::prestate(const std::string& state_path) {
  LoadedState loaded = load_state(state_path, nullptr);
  if (loaded.config.memory_bytes != config_.memory_bytes || loaded.config.vcpus != config_.vcpus)
    throw SnapshotIncompatibleError(state_path + " is not a snapshot of this machine's shape");
  restore_vm_state(loaded.file, false);  // the clock is set at the restore itself
  prestate_targets_ = std::move(loaded.targets);
  prestate_errors_.assign(config_.vcpus, {});
  prestated_ = true;
}

std::unique_ptr<Machine> Machine::finish_prestated_restore(std::unique_ptr<Machine> machine, PhaseClock clock,
                                                           std::chrono::nanoseconds deadline,
                                                           int inject_apply_failure) {
  machine->inject_apply_failure_ = inject_apply_failure;
  machine->vm_.set_clock(machine->prestate_clock_);
  {
    std::lock_guard lock(machine->mutex_);
    machine->started_ = true;
    machine->loop_.start();
  }
  clock.stamp("vm_state_threads");
  try {
    // Phase 1 sets each vCPU's TSC to the snapshot's (prestated_), phase 2 runs them.
    machine->coordinator_.restore(std::move(machine->prestate_targets_), deadline);
  } catch (const DeadlineExceeded& e) {
    throw DeadlineError(std::string("restore: ") + e.what(), static_cast<int>(e.vcpu));
  } catch (const VcpuFailed& e) {
    throw DeadlineError(std::string("restore: ") + e.what(), static_cast<int>(e.vcpu));
  }
  machine->prestated_ = false;
  clock.stamp("vcpu_apply");
  machine->restore_clock_ = std::move(clock);
  return machine;
}

// ---------------------------------------------------------------- working sets
//
// What a restored guest touches first (PVM-HOST-FACTS.md 8.1, 8.5): each page
// costs a shadow fault, about 4 us for a file page read and 6 us for a
// written one on a quiet host (the COW); a page already private and writable
// in the VMM costs the bare fault, and KVM maps its writable neighbours with
// it. A Sandbox template records the pages its first restore touched
// (write_working_set); prepared machines, or a restore without one, copy
// them ahead (sandbox.py). Restore to the first byte of `echo hi` (busybox,
// images mapped in 2 MiB pieces, 15 runs interleaved): the 291 pages written
// copied 27.0 ms and 974 exits; the 4,723 touched 20.1 ms and 660 exits, for
// 18 MiB of copies instead of 1.1 MiB.

std::vector<std::pair<uint64_t, uint64_t>> Machine::resident_pages(bool private_only) const {
  UniqueFd fd(::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC));
  if (!fd) throw HypervisorError(std::string("open /proc/self/pagemap: ") + std::strerror(errno));
  const uint64_t pages = memory_->size() / 4096;
  const uint64_t first = reinterpret_cast<uintptr_t>(memory_->host()) / 4096;
  const bool restored = memory_->restored();  // fresh RAM is anonymous: all of it is the machine's own
  std::vector<std::pair<uint64_t, uint64_t>> runs;
  std::vector<uint64_t> entries(8192);
  for (uint64_t done = 0; done < pages;) {
    uint64_t n = std::min<uint64_t>(entries.size(), pages - done);
    ssize_t got = ::pread(fd.get(), entries.data(), n * 8, static_cast<off_t>((first + done) * 8));
    if (got != static_cast<ssize_t>(n * 8)) throw HypervisorError("short read of /proc/self/pagemap");
    for (uint64_t i = 0; i < n; ++i) {
      if (!(entries[i] >> 63)) continue;                           // bit 63: present
      if (private_only && (entries[i] >> 61 & 1) && restored) continue;  // bit 61: a file page (not yet COWed)
      uint64_t page = done + i;
      if (!runs.empty() && runs.back().first + runs.back().second == page) ++runs.back().second;
      else runs.emplace_back(page, 1);
    }
    done += n;
  }
  return runs;
}

void Machine::write_working_set(const std::string& path) const {
  // Every page the restore touched, except in 2 MiB blocks it touched
  // whole: those were only read and the host mapped them in one piece
  // (MADV_HUGEPAGE in map_layers), and the shadow MMU maps such a block in
  // one fault where the guest maps it with one 2 MiB entry (kernel text, the
  // direct map). Elsewhere each page the guest touches costs a shadow fault,
  // unless it is already private and writable in the VMM, when KVM maps its
  // 7 neighbours with it: prepared machines copy these pages ahead.
  constexpr uint64_t kBlock = kHugePageSize / 4096;
  std::vector<std::pair<uint64_t, uint64_t>> runs;
  std::map<uint64_t, uint64_t> present_per_block;
  std::set<uint64_t> written_blocks;
  const auto resident = resident_pages(false);
  for (const auto& [page, count] : resident)
    for (uint64_t p = page; p < page + count; ++p) ++present_per_block[p / kBlock];
  for (const auto& [page, count] : resident_pages(true))
    for (uint64_t p = page; p < page + count; ++p) written_blocks.insert(p / kBlock);
  for (const auto& [page, count] : resident) {
    for (uint64_t p = page; p < page + count; ++p) {
      const uint64_t block = p / kBlock;
      if (present_per_block[block] == kBlock && !written_blocks.count(block)) continue;
      if (!runs.empty() && runs.back().first + runs.back().second == p) ++runs.back().second;
      else runs.emplace_back(p, 1);
    }
  }
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  for (const auto& [page, count] : runs) {
    out.write(reinterpret_cast<const char*>(&page), 8);
    out.write(reinterpret_cast<const char*>(&count), 8);
  }
  if (!out.flush()) throw HypervisorError("cannot write the working set " + path);
}

// Pages a working set copied ahead that still hold what the images hold:
// private, so pagemap counts them as written, but nothing to save. Compared
// against a fresh read-only mapping of the images (the shared page cache).
std::function<bool(uint64_t)> Machine::unchanged_copies() const {
  const auto& runs = memory_->copied_ahead();
  if (runs.empty()) return {};
  auto images = std::make_shared<Mapping>(map_memory_layers(memory_->layers(), memory_->size()));
  auto copied = std::make_shared<std::vector<bool>>(memory_->size() / 4096);
  for (auto [first, count] : runs)
    for (uint64_t p = first; p < first + count && p < copied->size(); ++p) (*copied)[p] = true;
  const uint8_t* host = memory_->host();
  return [images, copied, host](uint64_t page) {
    return (*copied)[page] && std::memcmp(host + page * 4096, images->as<uint8_t>() + page * 4096, 4096) == 0;
  };
}

void Machine::prefetch_working_set(GuestMemory& memory, const std::string& path,
                                   const std::vector<std::string>& layers) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw HypervisorError("cannot read the working set " + path);
  const uint64_t pages = memory.size() / 4096;
  std::vector<std::pair<uint64_t, uint64_t>> copied;
  uint64_t run[2];
  while (in.read(reinterpret_cast<char*>(run), sizeof run)) {
    uint64_t first = std::min(run[0], pages), count = std::min(run[1], pages - first);
    if (count == 0) continue;  // pages beyond this machine's RAM: not ours to copy
    // Not fatal if it fails (an old kernel without MADV_POPULATE_WRITE, or
    // memory pressure): the guest then takes the ordinary faults.
    ::madvise(memory.host() + first * 4096, count * 4096, MADV_POPULATE_WRITE);
    copied.emplace_back(first, count);
  }
  memory.note_copied_ahead(std::move(copied), layers);
}

}  // namespace cellvm
