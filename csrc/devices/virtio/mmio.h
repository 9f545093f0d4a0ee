// The virtio-mmio transport (virtio 1.x, section 4.2, "modern" version 2):
// one 4 KiB register window per device on the MMIO bus and one interrupt
// line. Linux finds each window through `virtio_mmio.device=4K@<base>:<irq>`
// on its command line (cmdline_fragment()).
#pragma once

#include <memory>
#include <mutex>

#include "devices/device.h"
#include "devices/virtio/virtio_device.h"
#include "vm/memory.h"

namespace cellvm {

class VirtioTransport : public Device {
 public:
  static constexpr uint64_t kWindow = 0x1000;

  VirtioTransport(Platform& platform, GuestMemory& memory, std::unique_ptr<VirtioDevice> device, uint64_t base,
                  uint32_t irq);
  std::string name() const override;  // "virtio-blk@0xd0001000": unique per machine
  void read(uint64_t offset, uint8_t* data, uint32_t len, int vcpu) override;
  void write(uint64_t offset, const uint8_t* data, uint32_t len, int vcpu) override;
  Blob save_state() const override;
  void restore_state(const Blob& state) override;

  std::string cmdline_fragment() const;
  uint64_t base() const { return base_; }
  VirtioDevice& device() { return *device_; }
  GuestMemory& memory() { return memory_; }
  Virtqueue& queue(int index) { return queues_.at(index); }
  bool driver_ok() const;
  bool driver_ok_locked() const;  // with lock() held

  // For devices: a used buffer is ready (raise the interrupt unless the
  // driver suppressed it). Call with lock() held.
  void notify_used(int queue);
  // For work that does not start on a vCPU thread (host input).
  std::unique_lock<std::mutex> lock() { return std::unique_lock(mutex_); }
  // The device hit a malformed queue: mark it broken (DEVICE_NEEDS_RESET)
  // and stop using it, as the spec asks, instead of guessing.
  void fail(const std::string& why);

 private:
  void set_interrupt(uint32_t bits);
  void reset_locked();

  Platform& platform_;
  GuestMemory& memory_;
  std::unique_ptr<VirtioDevice> device_;
  uint64_t base_;
  uint32_t irq_;
  mutable std::mutex mutex_;
  std::vector<Virtqueue> queues_;
  uint32_t status_ = 0;
  uint32_t device_features_sel_ = 0, driver_features_sel_ = 0;
  uint64_t driver_features_ = 0;
  uint32_t queue_sel_ = 0;
  uint32_t interrupt_status_ = 0;
  uint32_t config_generation_ = 0;
};

}  // namespace cellvm
