// The test device: the MMIO window our own test guests (guest/testguests/)
// report through. Registers (8-byte stores at these offsets):
//   0x000 console  low byte appended to the console
//   0x008 exit     stop the machine; the value is the guest's exit code
//   0x010 mark     append (value, vCPU, host time) to the mark log
//   0x018 sink     ignored: the cheapest possible MMIO exit, for benchmarks
//   0x100 + 8*i    report of vCPU i: the last value is kept, and a count
#pragma once

#include <chrono>
#include <mutex>
#include <vector>

#include "devices/device.h"

namespace cellvm {

class TestDevice : public Device {
 public:
  static constexpr uint64_t kBase = 0xd0000000;
  static constexpr uint64_t kSize = 0x1000;
  static constexpr int kMaxVcpus = 32;

  struct Mark {
    uint64_t value;
    int vcpu;
    std::chrono::steady_clock::time_point when;
  };
  struct Report {
    uint64_t last = 0;
    uint64_t count = 0;
  };

  explicit TestDevice(Platform& platform) : platform_(platform) {}
  std::string name() const override { return "testdev"; }
  void read(uint64_t offset, uint8_t* data, uint32_t len, int vcpu) override;
  void write(uint64_t offset, const uint8_t* data, uint32_t len, int vcpu) override;

  Blob save_state() const override;
  void restore_state(const Blob& state) override;

  std::vector<Report> reports() const;
  std::vector<Mark> marks() const;

 private:
  Platform& platform_;
  mutable std::mutex mutex_;
  Report reports_[kMaxVcpus];
  std::vector<Mark> marks_;
};

}  // namespace cellvm
