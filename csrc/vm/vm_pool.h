// Machines prepared ahead of restores, so that a restore is only "map the
// images, set the state, run".
//
// Creating a VM for a restore costs KVM_CREATE_VM, the memslot (which grows
// ~0.5 ms per GiB of guest memory on this host), the irqchip, the vCPUs with
// their CPUID and the vCPU threads: about 0.6-1.7 ms of a 0.8-1.8 ms restore
// (PVM-HOST-FACTS.md 8.4, BENCHMARKS.md). None of it depends on the snapshot,
// only on its shape, so a worker thread builds such machines in advance.
//
// A pool entry is keyed by shape (memory size, vCPUs) and optionally by the
// memory images:
//   - shape only: RAM is an empty anonymous range under the memslot; the
//     restore maps the snapshot's images over it with MAP_FIXED (KVM follows
//     through its MMU notifier).
//   - shape and images: RAM already is those images mapped MAP_PRIVATE, so
//     the restore skips the mapping too. Snapshot directories are immutable,
//     so a path names its content.
//   - shape, images and state file: the state is read, checked and put in
//     place as well (Machine::prepare), so the restore only sets the clock and
//     the TSCs and runs. Such a machine holds the state as it was read when it
//     was prepared; a restore that attaches devices does not use it.
// A premapped entry may also name a working set (Machine::prepare): the
// pages a restored guest touched first, copied (pre-COWed) while the
// machine is built, so the guest's first steps take cheaper shadow faults.
// It belongs to the entry, not to its key: restores find the machine by its
// images whatever was prefetched into it.
// Machine::restore() takes a machine from the pool when one of the right key
// is ready (images first, then shape) and builds a new one otherwise, so the
// pool changes how fast a restore is, never what it does. Every target is 0
// until someone sets one: by default nothing is built ahead. The worker
// refills kRefillDelay after the last take, off the restore's critical path.
#pragma once

#include <chrono>
#include <compare>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace cellvm {

class Machine;

class VmPool {
 public:
  struct Key {
    uint64_t memory_bytes = 0;
    int vcpus = 0;
    std::vector<std::string> layers;  // empty: RAM is mapped at restore time
    std::string state;                // non-empty: the state is in place too (needs layers)
    auto operator<=>(const Key&) const = default;
  };
  struct Status {
    Key key;
    int target = 0;
    int ready = 0;
    std::string error;  // why the last build failed (the worker stops building this key)
  };

  // The worker refills no sooner than this after the last take: building a
  // VM (1-2 ms of CPU at 2 GiB) while the restored guest makes its first
  // steps slowed that restore down by a third to two thirds on this 2-CPU
  // host (p50 at 2 GiB 1.63 -> 0.54 ms, at 256 MiB 0.85 -> 0.53 ms).
  static constexpr std::chrono::milliseconds kRefillDelay{20};

  static VmPool& instance();

  // Keep `count` prepared machines of `key` ready; 0 drops the key and its
  // machines. The worker builds them one at a time in the background, each
  // with `working_set` (a file, see Machine::prepare) prefetched if given.
  void set_target(const Key& key, int count, const std::string& working_set = {});
  // A prepared machine of `key`, or nullptr if none is ready. Never builds
  // (the worker refills behind it).
  std::unique_ptr<Machine> take(const Key& key);
  // A machine prepared with this state file and these images, any shape.
  std::unique_ptr<Machine> take_prestated(const std::string& state, const std::vector<std::string>& layers);
  // Blocks until `key` has `count` ready machines (or its build failed, or
  // `timeout` passed); returns how many are ready.
  int wait_ready(const Key& key, int count, std::chrono::nanoseconds timeout);
  std::vector<Status> status() const;
  // Every target to 0, every prepared machine closed, the worker stopped.
  void clear();

 private:
  VmPool() = default;
  struct Entry {
    int target = 0;
    std::string working_set;
    std::vector<std::unique_ptr<Machine>> ready;
    std::string error;
    // Changes when the request does (a new entry, another working set): a
    // machine whose build began under another request is not this one's.
    uint64_t request = 0;
  };
  void worker();
  void ensure_worker();  // caller holds mutex_

  mutable std::mutex mutex_;
  std::condition_variable work_cv_;   // the worker waits for a deficit
  std::condition_variable ready_cv_;  // wait_ready() waits for machines
  std::map<Key, Entry> entries_;
  std::thread worker_;
  bool stopping_ = false;
  uint64_t requests_ = 0;
  std::chrono::steady_clock::time_point last_take_{};
};

}  // namespace cellvm
