#include "devices/virtio/queue.h"

#include <atomic>
#include <cstring>
#include <string>

namespace cellvm {

namespace {

constexpr uint16_t kDescNext = 1, kDescWrite = 2, kDescIndirect = 4;
constexpr uint16_t kAvailNoInterrupt = 1;

struct Descriptor {
  uint64_t addr;
  uint32_t len;
  uint16_t flags;
  uint16_t next;
};
static_assert(sizeof(Descriptor) == 16);

// Ring fields are shared with the guest: read them once, as volatile.
template <class T>
T read_shared(const uint8_t* p) {
  T value;
  std::memcpy(&value, const_cast<const uint8_t*>(p), sizeof value);
  return value;
}

}  // namespace

size_t DescriptorChain::readable_bytes() const {
  size_t n = 0;
  for (const GuestBuffer& b : buffers)
    if (!b.device_writable) n += b.len;
  return n;
}

size_t DescriptorChain::writable_bytes() const {
  size_t n = 0;
  for (const GuestBuffer& b : buffers)
    if (b.device_writable) n += b.len;
  return n;
}

size_t DescriptorChain::read(void* out, size_t len, size_t offset) const {
  auto* dest = static_cast<uint8_t*>(out);
  size_t done = 0;
  for (const GuestBuffer& b : buffers) {
    if (b.device_writable || done == len) continue;
    if (offset >= b.len) {
      offset -= b.len;
      continue;
    }
    size_t n = std::min<size_t>(b.len - offset, len - done);
    std::memcpy(dest + done, b.data + offset, n);
    done += n;
    offset = 0;
  }
  return done;
}

size_t DescriptorChain::write(const void* in, size_t len, size_t offset) {
  const auto* src = static_cast<const uint8_t*>(in);
  size_t done = 0;
  for (GuestBuffer& b : buffers) {
    if (!b.device_writable || done == len) continue;
    if (offset >= b.len) {
      offset -= b.len;
      continue;
    }
    size_t n = std::min<size_t>(b.len - offset, len - done);
    std::memcpy(b.data + offset, src + done, n);
    done += n;
    offset = 0;
  }
  return done;
}

std::optional<DescriptorChain> Virtqueue::pop(GuestMemory& memory) {
  if (!ready || size == 0) return std::nullopt;
  // avail ring: u16 flags, u16 idx, u16 ring[size]
  const uint8_t* avail = memory.at(driver_gpa, 4 + 2 * size);
  uint16_t avail_idx = read_shared<uint16_t>(avail + 2);
  if (static_cast<uint16_t>(avail_idx - next_avail_) > size)
    throw VirtqueueError("driver's avail index ran more than a queue ahead");
  if (avail_idx == next_avail_) return std::nullopt;
  std::atomic_thread_fence(std::memory_order_acquire);  // ring entry after idx

  uint16_t head = read_shared<uint16_t>(avail + 4 + 2 * (next_avail_ % size));
  ++next_avail_;
  if (head >= size) throw VirtqueueError("descriptor head " + std::to_string(head) + " out of the table");

  const uint8_t* table = memory.at(desc_gpa, uint64_t(16) * size);
  DescriptorChain chain{head, {}};
  uint16_t index = head;
  for (uint16_t steps = 0;; ++steps) {
    if (steps >= size) throw VirtqueueError("descriptor chain loops");
    auto desc = read_shared<Descriptor>(table + 16 * index);
    if (desc.flags & kDescIndirect) throw VirtqueueError("indirect descriptors were not negotiated");
    uint8_t* data;
    try {
      data = memory.at(desc.addr, desc.len);
    } catch (const std::out_of_range&) {
      throw VirtqueueError("descriptor buffer outside guest memory");
    }
    chain.buffers.push_back({data, desc.len, (desc.flags & kDescWrite) != 0});
    if (!(desc.flags & kDescNext)) break;
    if (desc.next >= size) throw VirtqueueError("descriptor next index out of the table");
    index = desc.next;
  }
  return chain;
}

bool Virtqueue::has_available(GuestMemory& memory) const {
  if (!ready || size == 0) return false;
  return read_shared<uint16_t>(memory.at(driver_gpa + 2, 2)) != next_avail_;
}

void Virtqueue::push_used(GuestMemory& memory, uint16_t head, uint32_t written) {
  // used ring: u16 flags, u16 idx, {u32 id, u32 len}[size]
  uint8_t* used = memory.at(device_gpa, 4 + 8 * size);
  uint8_t* slot = used + 4 + 8 * (next_used_ % size);
  uint32_t id = head;
  std::memcpy(slot, &id, 4);
  std::memcpy(slot + 4, &written, 4);
  ++next_used_;
  std::atomic_thread_fence(std::memory_order_release);  // entry before idx
  std::memcpy(used + 2, &next_used_, 2);
}

bool Virtqueue::interrupt_suppressed(GuestMemory& memory) const {
  const uint8_t* avail = memory.at(driver_gpa, 4);
  return read_shared<uint16_t>(avail) & kAvailNoInterrupt;
}

}  // namespace cellvm
