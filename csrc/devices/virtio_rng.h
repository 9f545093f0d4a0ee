// virtio-rng (device 4): the guest's entropy source, filled from the host's
// getrandom(). One queue; every writable buffer the driver posts is filled.
#pragma once

#include "devices/virtio/virtio_device.h"

namespace cellvm {

class VirtioRng : public VirtioDevice {
 public:
  std::string name() const override { return "rng"; }
  uint32_t device_id() const override { return 4; }
  uint64_t features() const override { return 0; }
  int queue_count() const override { return 1; }
  void process_queue(VirtioTransport& transport, int queue) override;
};

}  // namespace cellvm
