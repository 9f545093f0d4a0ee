// virtio-console (device 3), one port: the guest agent's channel. The guest
// sees /dev/hvc0; the host side is a socket (one end of a socketpair whose
// other end the SDK holds). Why a console and not vsock: one multiplexed
// byte stream is all the agent protocol needs, and a console is two queues
// and no per-connection protocol in the VMM (no vhost here: every device is
// emulated in this process, so less device is less exit-time work).
//
// Flow control both ways: guest output is copied into a bounded buffer and
// written to the socket from the machine's event loop; once the buffer is
// full the device stops taking transmit buffers, so a slow host reader slows
// the guest instead of growing memory. Host input is read only while the
// guest has posted receive buffers.
#pragma once

#include <deque>
#include <vector>

#include "common/fd.h"
#include "devices/virtio/virtio_device.h"
#include "vm/event_loop.h"

namespace cellvm {

class VirtioConsole : public VirtioDevice {
 public:
  static constexpr size_t kBufferLimit = 1 << 20;
  static constexpr int kReceiveQueue = 0, kTransmitQueue = 1;

  // Takes ownership of `backend`, the VMM's end of the host socket.
  VirtioConsole(UniqueFd backend, EventLoop& loop);
  ~VirtioConsole() override;
  std::string name() const override { return "console"; }
  uint32_t device_id() const override { return 3; }
  uint64_t features() const override { return 0; }
  int queue_count() const override { return 2; }
  void read_config(uint64_t offset, uint8_t* data, uint32_t len) override;
  void process_queue(VirtioTransport& transport, int queue) override;
  void activate(VirtioTransport& transport) override;
  void reset() override;
  Blob save_state() const override;
  void restore_state(const Blob& state) override;

 private:
  void take_transmit(VirtioTransport& transport);
  void deliver_input(VirtioTransport& transport);
  void flush_output();
  void on_backend(VirtioTransport& transport, uint32_t events);
  void update_interest();

  UniqueFd backend_;
  EventLoop& loop_;
  VirtioTransport* transport_ = nullptr;  // set at activate
  std::deque<uint8_t> output_;  // guest -> host, not yet written to the socket
  std::vector<uint8_t> input_;  // host -> guest, read but not yet delivered
  bool registered_ = false, backend_closed_ = false;
  uint32_t interest_ = 0;
};

}  // namespace cellvm
