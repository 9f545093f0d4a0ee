// The guest console as the host keeps it: the last kCapacity bytes, enough
// for an error's tail and for tests, never unbounded.
#pragma once

#include <cstdint>
#include <deque>
#include <mutex>
#include <string>

namespace cellvm {

class Console {
 public:
  static constexpr size_t kCapacity = 1 << 20;

  void append(const uint8_t* data, size_t len) {
    std::lock_guard lock(mutex_);
    buffer_.insert(buffer_.end(), data, data + len);
    while (buffer_.size() > kCapacity) buffer_.pop_front();
    total_ += len;
  }
  std::string text() const {
    std::lock_guard lock(mutex_);
    return std::string(buffer_.begin(), buffer_.end());
  }
  std::string tail(size_t bytes) const {
    std::lock_guard lock(mutex_);
    size_t n = std::min(bytes, buffer_.size());
    return std::string(buffer_.end() - n, buffer_.end());
  }
  uint64_t total() const {
    std::lock_guard lock(mutex_);
    return total_;
  }

 private:
  mutable std::mutex mutex_;
  std::deque<char> buffer_;
  uint64_t total_ = 0;
};

}  // namespace cellvm
