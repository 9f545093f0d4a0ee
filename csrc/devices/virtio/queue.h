// A split virtqueue (virtio 1.x, section 2.7) read from guest memory.
//
// Everything here comes from the guest and is checked where it is read:
// ring indices against the queue size, descriptor indices against the
// table, chains against loops (no chain is longer than the queue), and
// every buffer against guest RAM. A bad chain is an error for that request,
// never a VMM crash and never an access outside guest memory.
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <vector>

#include "vm/memory.h"

namespace cellvm {

class VirtqueueError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// One buffer of a descriptor chain, already checked to lie in guest RAM.
struct GuestBuffer {
  uint8_t* data;
  uint32_t len;
  bool device_writable;
};

struct DescriptorChain {
  uint16_t head;
  std::vector<GuestBuffer> buffers;
  // Helpers over the buffers, in order: what the driver gave us to read,
  // and room for us to write.
  size_t readable_bytes() const;
  size_t writable_bytes() const;
  size_t read(void* out, size_t len, size_t offset = 0) const;   // from readable buffers
  size_t write(const void* in, size_t len, size_t offset = 0);   // into writable buffers
};

class Virtqueue {
 public:
  static constexpr uint16_t kMaxSize = 256;

  // Transport-facing configuration (virtio-mmio queue registers).
  uint16_t size = 0;  // negotiated QueueNum
  bool ready = false;
  uint64_t desc_gpa = 0, driver_gpa = 0, device_gpa = 0;

  // The next available chain, or nullopt when the driver has posted none.
  // Throws VirtqueueError for a malformed ring or chain (the caller resets
  // the device or drops the request).
  std::optional<DescriptorChain> pop(GuestMemory& memory);
  // Whether pop() would return a chain (without taking it).
  bool has_available(GuestMemory& memory) const;
  // Returns a chain to the driver with `written` bytes written into it.
  void push_used(GuestMemory& memory, uint16_t head, uint32_t written);
  // Whether the driver asked not to be interrupted (VIRTQ_AVAIL_F_NO_INTERRUPT).
  bool interrupt_suppressed(GuestMemory& memory) const;

  uint16_t next_avail() const { return next_avail_; }
  uint16_t next_used() const { return next_used_; }
  void set_indices(uint16_t avail, uint16_t used) { next_avail_ = avail, next_used_ = used; }
  void reset() { *this = Virtqueue{}; }

 private:
  uint16_t next_avail_ = 0;  // free-running, as the spec's idx fields
  uint16_t next_used_ = 0;
};

}  // namespace cellvm
