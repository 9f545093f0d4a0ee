// Guest RAM: one contiguous range at GPA 0. A fresh machine's is private
// anonymous memory that the host backs with transparent huge pages; a
// restored machine's is its snapshot images mapped MAP_PRIVATE.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "common/fd.h"

namespace cellvm {

class GuestMemory {
 public:
  // Zero-filled and lazily allocated: anonymous memory on a 2 MiB boundary
  // with MADV_HUGEPAGE. The shadow MMU of kvm-pvm maps a guest 2 MiB page
  // with one 2 MiB shadow entry only where the host maps it with a huge
  // page too: a boot through cellvm's VMM took 4,114 shadow faults on a
  // memfd (shmem gets no huge pages on these hosts), 1,268 with this.
  explicit GuestMemory(uint64_t size);
  // Restored memory: a MAP_PRIVATE mapping of snapshot images.
  explicit GuestMemory(Mapping restored) : map_(std::move(restored)), restored_(true) {}
  // An empty anonymous range (reads as zero, nothing allocated) for a
  // machine prepared ahead of a restore, which maps its images over it.
  static GuestMemory reserved(uint64_t size);
  bool restored() const { return restored_; }

  // Pages a working set copied ahead (private but maybe never written by
  // the guest) and the images they came from: a diff snapshot leaves out
  // those that still equal the images (Machine::snapshot).
  void note_copied_ahead(std::vector<std::pair<uint64_t, uint64_t>> runs, std::vector<std::string> layers) {
    copied_ahead_ = std::move(runs);
    layers_ = std::move(layers);
  }
  const std::vector<std::pair<uint64_t, uint64_t>>& copied_ahead() const { return copied_ahead_; }
  const std::vector<std::string>& layers() const { return layers_; }

  uint64_t size() const { return map_.size(); }
  uint8_t* host() const { return map_.as<uint8_t>(); }

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
  Mapping map_;
  bool restored_ = false;
  std::vector<std::pair<uint64_t, uint64_t>> copied_ahead_;  // (first page, count)
  std::vector<std::string> layers_;
};

}  // namespace cellvm
