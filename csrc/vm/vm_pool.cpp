#include "vm/vm_pool.h"

#include <exception>
#include <stdexcept>

#include "vm/machine.h"

namespace cellvm {

VmPool& VmPool::instance() {
  // Never destroyed: prepared machines own threads that must not be torn
  // down during static destruction. The Python package calls clear() at exit.
  static VmPool* pool = new VmPool();
  return *pool;
}

void VmPool::ensure_worker() {
  if (!worker_.joinable()) worker_ = std::thread(&VmPool::worker, this);
}

void VmPool::set_target(const Key& key, int count, const std::string& working_set) {
  if (count < 0) throw std::invalid_argument("a pool target must be >= 0");
  std::vector<std::unique_ptr<Machine>> dropped;
  {
    std::lock_guard lock(mutex_);
    if (count == 0) {
      auto it = entries_.find(key);
      if (it == entries_.end()) return;
      dropped = std::move(it->second.ready);
      entries_.erase(it);
    } else {
      auto [it, created] = entries_.try_emplace(key);
      Entry& entry = it->second;
      if (created || entry.working_set != working_set) entry.request = ++requests_;
      entry.target = count;
      entry.working_set = working_set;
      entry.error.clear();  // a new request retries a key whose build failed
      while (static_cast<int>(entry.ready.size()) > count) {
        dropped.push_back(std::move(entry.ready.back()));
        entry.ready.pop_back();
      }
      ensure_worker();
      work_cv_.notify_all();
    }
  }
  // `dropped` closes its machines here, outside the lock.
}

std::unique_ptr<Machine> VmPool::take(const Key& key) {
  std::lock_guard lock(mutex_);
  auto it = entries_.find(key);
  if (it == entries_.end() || it->second.ready.empty()) return nullptr;
  std::unique_ptr<Machine> machine = std::move(it->second.ready.back());
  it->second.ready.pop_back();
  last_take_ = std::chrono::steady_clock::now();
  work_cv_.notify_all();  // refill behind it
  return machine;
}

std::unique_ptr<Machine> VmPool::take_prestated(const std::string& state, const std::vector<std::string>& layers) {
  {
    std::lock_guard lock(mutex_);
    if (entries_.empty()) return nullptr;
  }
  for (const Status& s : status())  // few keys: a scan is fine
    if (s.key.state == state && s.key.layers == layers && s.ready > 0)
      if (std::unique_ptr<Machine> machine = take(s.key)) return machine;
  return nullptr;
}

int VmPool::wait_ready(const Key& key, int count, std::chrono::nanoseconds timeout) {
  std::unique_lock lock(mutex_);
  auto ready = [&] {
    auto it = entries_.find(key);
    return it == entries_.end() || !it->second.error.empty() || static_cast<int>(it->second.ready.size()) >= count;
  };
  ready_cv_.wait_for(lock, timeout, ready);
  auto it = entries_.find(key);
  return it == entries_.end() ? 0 : static_cast<int>(it->second.ready.size());
}

std::vector<VmPool::Status> VmPool::status() const {
  std::lock_guard lock(mutex_);
  std::vector<Status> out;
  for (const auto& [key, entry] : entries_)
    out.push_back({key, entry.target, static_cast<int>(entry.ready.size()), entry.error});
  return out;
}

void VmPool::clear() {
  std::map<Key, Entry> dropped;
  std::thread worker;
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
    dropped.swap(entries_);
    worker = std::move(worker_);
    work_cv_.notify_all();
    ready_cv_.notify_all();
  }
  if (worker.joinable()) worker.join();  // it drops what it was building
  dropped.clear();
  std::lock_guard lock(mutex_);
  stopping_ = false;
}

void VmPool::worker() {
  std::unique_lock lock(mutex_);
  while (!stopping_) {
    const Key* wanted = nullptr;
    for (const auto& [key, entry] : entries_)
      if (entry.error.empty() && static_cast<int>(entry.ready.size()) < entry.target) {
        wanted = &key;
        break;
      }
    if (!wanted) {
      work_cv_.wait(lock);
      continue;
    }
    if (auto at = last_take_ + kRefillDelay; std::chrono::steady_clock::now() < at) {
      work_cv_.wait_until(lock, at);
      continue;
    }
    Key key = *wanted;
    std::string working_set = entries_[key].working_set;
    const uint64_t request = entries_[key].request;
    lock.unlock();
    std::unique_ptr<Machine> machine;
    std::string error;
    try {
      machine = Machine::prepare({key.memory_bytes, key.vcpus}, key.layers, key.state, working_set);
    } catch (const std::exception& e) {
      error = e.what();
    }
    lock.lock();
    auto it = entries_.find(key);
    if (!stopping_ && it != entries_.end() && it->second.request == request) {
      if (!error.empty()) {
        it->second.error = error;
      } else if (static_cast<int>(it->second.ready.size()) < it->second.target) {
        it->second.ready.push_back(std::move(machine));
      }
    }
    ready_cv_.notify_all();
    if (machine) {  // not wanted any more: close it outside the lock
      lock.unlock();
      machine.reset();
      lock.lock();
    }
  }
}

}  // namespace cellvm
