#include "vm/memory.h"

#include <sys/mman.h>

#include <stdexcept>

#include "common/errors.h"

namespace cellvm {

GuestMemory::GuestMemory(uint64_t size) {
  if (size == 0 || size % 4096 != 0) throw std::invalid_argument("guest memory size must be a non-zero multiple of 4 KiB");
  void* addr = map_anonymous_huge_aligned(size);
  if (addr == MAP_FAILED) throw HypervisorError::from_errno("mmap(guest ram)");
  map_ = Mapping(addr, size);
  ::madvise(addr, size, MADV_HUGEPAGE);  // advice only: without THP the guest still runs
}

GuestMemory GuestMemory::reserved(uint64_t size) {
  if (size == 0 || size % 4096 != 0) throw std::invalid_argument("guest memory size must be a non-zero multiple of 4 KiB");
  void* addr = map_anonymous_huge_aligned(size);
  if (addr == MAP_FAILED) throw HypervisorError::from_errno("mmap(reserved guest ram)");
  return GuestMemory(Mapping(addr, size));  // restored: snapshot images are mapped over it
}

uint8_t* GuestMemory::at(uint64_t gpa, uint64_t len) const {
  if (gpa > size() || len > size() - gpa)
    throw std::out_of_range("guest physical range outside RAM: " + std::to_string(gpa) + "+" + std::to_string(len));
  return host() + gpa;
}

}  // namespace cellvm
