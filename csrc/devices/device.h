// What every emulated device implements, and the buses that route guest
// port I/O and MMIO accesses to them. A device knows nothing of the vCPU
// loop or of the transport; the machine registers it on a bus at a base.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "snapshot/state_file.h"

namespace cellvm {

class Device {
 public:
  virtual ~Device() = default;
  virtual std::string name() const = 0;
  // `offset` is relative to the base the device was registered at.
  // Accesses come from any vCPU thread: devices lock their own state.
  virtual void read(uint64_t offset, uint8_t* data, uint32_t len, int vcpu) = 0;
  virtual void write(uint64_t offset, const uint8_t* data, uint32_t len, int vcpu) = 0;
  // The device's own snapshot state, a blob only it reads back (start it
  // with a version of its own). Saved while every vCPU is paused.
  virtual Blob save_state() const { return {}; }
  virtual void restore_state(const Blob& state) { (void)state; }
};

// Routes an address to the device whose range holds it. Registration
// happens before any vCPU runs; lookups are read-only afterwards.
class Bus {
 public:
  void add(uint64_t base, uint64_t size, Device* device);
  // The device at `addr` and the offset into it, or nullptr.
  Device* find(uint64_t addr, uint64_t* offset) const;

 private:
  struct Range {
    uint64_t base, size;
    Device* device;
  };
  std::vector<Range> ranges_;
};

// How a device reaches the machine it sits in.
class Platform {
 public:
  virtual ~Platform() = default;
  virtual void set_irq_line(uint32_t irq, bool level) = 0;
  // The guest asked the machine to stop with `code` (test device, power-off).
  virtual void guest_exit(int64_t code) = 0;
  virtual void console_output(const uint8_t* data, size_t len) = 0;
};

}  // namespace cellvm
