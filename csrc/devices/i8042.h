// Just enough of the i8042 keyboard controller for a guest to reset the
// machine (Linux `reboot=k`: write 0xfe to port 0x64). Our guests have no
// ACPI, so this reset is how they power off: the machine stops with exit
// code 0, the same as a test guest's clean exit.
#pragma once

#include "devices/device.h"

namespace cellvm {

class I8042 : public Device {
 public:
  static constexpr uint16_t kDataPort = 0x60;
  static constexpr uint16_t kCommandPort = 0x64;

  explicit I8042(Platform& platform) : platform_(platform) {}
  std::string name() const override { return "i8042"; }
  // Registered at 0x60 with size 5: offset 0 is data, offset 4 command/status.
  void read(uint64_t offset, uint8_t* data, uint32_t len, int vcpu) override;
  void write(uint64_t offset, const uint8_t* data, uint32_t len, int vcpu) override;

 private:
  Platform& platform_;
};

}  // namespace cellvm
