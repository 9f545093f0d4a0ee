// A one-port power switch: the guest writes a byte to port 0xf4 and the
// machine stops with that byte as its exit code. Our guest kernel powers
// off this way (`poweroff_port=0xf4`, guest/kernel/patches: there is no
// ACPI); the port is the one QEMU's isa-debug-exit uses, so the same kernel
// stops QEMU too.
#pragma once

#include "devices/device.h"

namespace cellvm {

class PowerPort : public Device {
 public:
  static constexpr uint16_t kPort = 0xf4;

  explicit PowerPort(Platform& platform) : platform_(platform) {}
  std::string name() const override { return "power"; }
  void read(uint64_t, uint8_t* data, uint32_t len, int) override { std::fill(data, data + len, 0); }
  void write(uint64_t, const uint8_t* data, uint32_t len, int) override {
    if (len >= 1) platform_.guest_exit(data[0]);
  }

 private:
  Platform& platform_;
};

}  // namespace cellvm
