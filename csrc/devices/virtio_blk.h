// virtio-blk (device 2): a disk backed by a host file. The image's root
// filesystem is attached read-only, so every VM of an image shares one file
// (and its page cache); an optional writable disk is a file of its own.
// Requests are served synchronously on the vCPU thread that notified.
#pragma once

#include <string>

#include "common/fd.h"
#include "devices/virtio/virtio_device.h"

namespace cellvm {

class VirtioBlk : public VirtioDevice {
 public:
  VirtioBlk(const std::string& path, bool read_only);
  std::string name() const override { return "blk"; }
  uint32_t device_id() const override { return 2; }
  uint64_t features() const override;
  int queue_count() const override { return 1; }
  void read_config(uint64_t offset, uint8_t* data, uint32_t len) override;
  void process_queue(VirtioTransport& transport, int queue) override;

 private:
  uint8_t handle(DescriptorChain& chain, uint32_t* written);

  UniqueFd fd_;
  std::string path_;
  bool read_only_;
  uint64_t sectors_ = 0;
};

}  // namespace cellvm
