#include <stdexcept>

#include "devices/device.h"

namespace cellvm {

void Bus::add(uint64_t base, uint64_t size, Device* device) {
  for (const Range& r : ranges_) {
    if (base < r.base + r.size && r.base < base + size)
      throw std::invalid_argument(device->name() + " overlaps " + r.device->name());
  }
  ranges_.push_back({base, size, device});
}

Device* Bus::find(uint64_t addr, uint64_t* offset) const {
  for (const Range& r : ranges_) {
    if (addr >= r.base && addr - r.base < r.size) {
      *offset = addr - r.base;
      return r.device;
    }
  }
  return nullptr;
}

}  // namespace cellvm
