// What a virtio device implements; the virtio-mmio transport (mmio.h) does
// the rest: feature negotiation, queue registers, status, interrupts.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "devices/virtio/queue.h"
#include "snapshot/state_file.h"

namespace cellvm {

class VirtioTransport;

class VirtioDevice {
 public:
  virtual ~VirtioDevice() = default;
  virtual std::string name() const = 0;
  virtual uint32_t device_id() const = 0;  // virtio spec section 5
  virtual uint64_t features() const = 0;   // device-specific bits; the transport adds VERSION_1
  virtual int queue_count() const = 0;
  virtual void read_config(uint64_t offset, uint8_t* data, uint32_t len) {
    std::fill(data, data + len, 0);
    (void)offset;
  }
  // The driver notified `queue` (on the vCPU thread that wrote QueueNotify).
  // Called with the transport's lock held.
  virtual void process_queue(VirtioTransport& transport, int queue) = 0;
  // The driver set DRIVER_OK: queues are live.
  virtual void activate(VirtioTransport& transport) { (void)transport; }
  virtual void reset() {}
  virtual Blob save_state() const { return {}; }
  virtual void restore_state(const Blob& state) { (void)state; }
};

}  // namespace cellvm
