// Guest RAM: one contiguous range at GPA 0, backed by a memfd so a snapshot
// can write it out and a restore can map a file MAP_PRIVATE in its place.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

#include "common/fd.h"

namespace cellvm {

class GuestMemory {
 public:
  explicit GuestMemory(uint64_t size);  // zero-filled, lazily allocated, memfd-backed
  // Restored memory: a MAP_PRIVATE mapping of snapshot images (no memfd).
  explicit GuestMemory(Mapping restored) : map_(std::move(restored)) {}
  // An empty anonymous range (reads as zero, nothing allocated) for a
  // machine prepared ahead of a restore, which maps its images over it.
  static GuestMemory reserved(uint64_t size);
  bool restored() const { return !fd_; }

  uint64_t size() const { return map_.size(); }
  uint8_t* host() const { return map_.as<uint8_t>(); }
  int fd() const { return fd_.get(); }  // -1 for restored memory

  // Host pointer to [gpa, gpa+len); throws std::out_of_range outside RAM.
  uint8_t* at(uint64_t gpa, uint64_t len) const;
  void write(uint64_t gpa, const void* data, uint64_t len) { std::memcpy(at(gpa, len), data, len); }
  void read(uint64_t gpa, void* out, uint64_t len) const { std::memcpy(out, at(gpa, len), len); }
  template <class T>
  void store(uint64_t gpa, const T& value) { write(gpa, &value, sizeof value); }
  template <class T>
  T load(uint64_t gpa) const {
    T value;
    read(gpa, &value, sizeof value);
    return value;
  }

 private:
  UniqueFd fd_;
  Mapping map_;
};

}  // namespace cellvm
