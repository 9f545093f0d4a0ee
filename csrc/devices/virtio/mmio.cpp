#include "devices/virtio/mmio.h"

#include <cstdio>
#include <cstring>

namespace cellvm {

namespace {

// Register offsets (virtio 1.x, 4.2.2).
enum : uint64_t {
  kMagic = 0x000, kVersion = 0x004, kDeviceId = 0x008, kVendorId = 0x00c,
  kDeviceFeatures = 0x010, kDeviceFeaturesSel = 0x014, kDriverFeatures = 0x020, kDriverFeaturesSel = 0x024,
  kQueueSel = 0x030, kQueueNumMax = 0x034, kQueueNum = 0x038, kQueueReady = 0x044, kQueueNotify = 0x050,
  kInterruptStatus = 0x060, kInterruptAck = 0x064, kStatus = 0x070,
  kQueueDescLow = 0x080, kQueueDescHigh = 0x084, kQueueDriverLow = 0x090, kQueueDriverHigh = 0x094,
  kQueueDeviceLow = 0x0a0, kQueueDeviceHigh = 0x0a4, kConfigGeneration = 0x0fc, kConfig = 0x100,
};
constexpr uint32_t kMagicValue = 0x74726976;  // "virt"
constexpr uint32_t kVendor = 0x4c564d43;      // "CMVL"
constexpr uint64_t kFeatureVersion1 = 1ull << 32;
constexpr uint32_t kStatusDriverOk = 4, kStatusNeedsReset = 64;
constexpr uint32_t kInterruptUsed = 1, kInterruptConfig = 2;

void set_low(uint64_t& v, uint32_t low) { v = (v & ~0xffffffffull) | low; }
void set_high(uint64_t& v, uint32_t high) { v = (v & 0xffffffffull) | (uint64_t(high) << 32); }

}  // namespace

VirtioTransport::VirtioTransport(Platform& platform, GuestMemory& memory, std::unique_ptr<VirtioDevice> device,
                                 uint64_t base, uint32_t irq)
    : platform_(platform), memory_(memory), device_(std::move(device)), base_(base), irq_(irq),
      queues_(device_->queue_count()) {}

std::string VirtioTransport::name() const {
  char buf[64];
  std::snprintf(buf, sizeof buf, "virtio-%s@0x%llx", device_->name().c_str(), static_cast<unsigned long long>(base_));
  return buf;
}

std::string VirtioTransport::cmdline_fragment() const {
  char buf[64];
  std::snprintf(buf, sizeof buf, "virtio_mmio.device=4K@0x%llx:%u", static_cast<unsigned long long>(base_), irq_);
  return buf;
}

bool VirtioTransport::driver_ok() const {
  std::lock_guard lock(mutex_);
  return driver_ok_locked();
}

bool VirtioTransport::driver_ok_locked() const {
  return (status_ & kStatusDriverOk) && !(status_ & kStatusNeedsReset);
}

void VirtioTransport::read(uint64_t offset, uint8_t* data, uint32_t len, int) {
  std::lock_guard lock(mutex_);
  if (offset >= kConfig) {
    device_->read_config(offset - kConfig, data, len);
    return;
  }
  uint32_t value = 0;
  uint64_t features = device_->features() | kFeatureVersion1;
  Virtqueue* q = queue_sel_ < queues_.size() ? &queues_[queue_sel_] : nullptr;
  switch (offset) {
    case kMagic: value = kMagicValue; break;
    case kVersion: value = 2; break;
    case kDeviceId: value = device_->device_id(); break;
    case kVendorId: value = kVendor; break;
    case kDeviceFeatures: value = device_features_sel_ == 0 ? uint32_t(features) : device_features_sel_ == 1 ? uint32_t(features >> 32) : 0; break;
    case kQueueNumMax: value = q ? Virtqueue::kMaxSize : 0; break;
    case kQueueReady: value = q && q->ready; break;
    case kInterruptStatus: value = interrupt_status_; break;
    case kStatus: value = status_; break;
    case kConfigGeneration: value = config_generation_; break;
    default: break;
  }
  std::memset(data, 0, len);
  std::memcpy(data, &value, std::min<uint32_t>(len, 4));
}

void VirtioTransport::write(uint64_t offset, const uint8_t* data, uint32_t len, int) {
  uint32_t value = 0;
  std::memcpy(&value, data, std::min<uint32_t>(len, 4));
  std::lock_guard lock(mutex_);
  if (offset >= kConfig) return;  // no writable config in our devices
  Virtqueue* q = queue_sel_ < queues_.size() ? &queues_[queue_sel_] : nullptr;
  // Queue registers may only change while the queue is not ready.
  bool q_writable = q && !q->ready;
  switch (offset) {
    case kDeviceFeaturesSel: device_features_sel_ = value; break;
    case kDriverFeaturesSel: driver_features_sel_ = value; break;
    case kDriverFeatures:
      if (driver_features_sel_ == 0) set_low(driver_features_, value);
      else if (driver_features_sel_ == 1) set_high(driver_features_, value);
      break;
    case kQueueSel: queue_sel_ = value; break;
    case kQueueNum:
      if (q_writable && value > 0 && value <= Virtqueue::kMaxSize && (value & (value - 1)) == 0) q->size = value;
      break;
    case kQueueReady:
      if (q) q->ready = value & 1;
      break;
    case kQueueDescLow: if (q_writable) set_low(q->desc_gpa, value); break;
    case kQueueDescHigh: if (q_writable) set_high(q->desc_gpa, value); break;
    case kQueueDriverLow: if (q_writable) set_low(q->driver_gpa, value); break;
    case kQueueDriverHigh: if (q_writable) set_high(q->driver_gpa, value); break;
    case kQueueDeviceLow: if (q_writable) set_low(q->device_gpa, value); break;
    case kQueueDeviceHigh: if (q_writable) set_high(q->device_gpa, value); break;
    case kQueueNotify:
      if (value < queues_.size() && (status_ & kStatusDriverOk) && !(status_ & kStatusNeedsReset)) {
        try {
          device_->process_queue(*this, static_cast<int>(value));
        } catch (const VirtqueueError& e) {
          fail(e.what());
        } catch (const std::out_of_range& e) {
          fail(std::string("ring outside guest memory: ") + e.what());
        }
      }
      break;
    case kInterruptAck:
      interrupt_status_ &= ~value;
      if (interrupt_status_ == 0) platform_.set_irq_line(irq_, false);
      break;
    case kStatus:
      if (value == 0) {
        reset_locked();
      } else {
        bool activating = !(status_ & kStatusDriverOk) && (value & kStatusDriverOk);
        status_ = value;
        if (activating) device_->activate(*this);
      }
      break;
    default: break;
  }
}

void VirtioTransport::notify_used(int queue) {
  if (queues_.at(queue).interrupt_suppressed(memory_)) return;
  set_interrupt(kInterruptUsed);
}

void VirtioTransport::set_interrupt(uint32_t bits) {
  bool was_clear = interrupt_status_ == 0;
  interrupt_status_ |= bits;
  // Edge on 0 -> pending; Linux acks before it walks the rings, so an event
  // that arrives while one is pending is seen by that walk.
  if (was_clear) platform_.set_irq_line(irq_, true);
}

void VirtioTransport::fail(const std::string& why) {
  std::fprintf(stderr, "cellvm: virtio-%s: %s; device needs reset\n", device_->name().c_str(), why.c_str());
  status_ |= kStatusNeedsReset;
  ++config_generation_;
  set_interrupt(kInterruptConfig);
}

void VirtioTransport::reset_locked() {
  for (Virtqueue& q : queues_) q.reset();
  status_ = 0;
  driver_features_ = 0;
  interrupt_status_ = 0;
  platform_.set_irq_line(irq_, false);
  device_->reset();
}

namespace {
struct QueueRecord {
  uint16_t size, ready, next_avail, next_used;
  uint64_t desc, driver, device;
};
}  // namespace

Blob VirtioTransport::save_state() const {
  std::lock_guard lock(mutex_);
  BlobWriter w;
  w.pod(uint32_t{1}).pod(status_).pod(driver_features_).pod(queue_sel_).pod(interrupt_status_).pod(config_generation_);
  w.pod(static_cast<uint32_t>(queues_.size()));
  for (const Virtqueue& q : queues_)
    w.pod(QueueRecord{q.size, q.ready, q.next_avail(), q.next_used(), q.desc_gpa, q.driver_gpa, q.device_gpa});
  Blob device = device_->save_state();
  w.sized(device.data(), device.size());
  return w.take();
}

void VirtioTransport::restore_state(const Blob& state) {
  BlobReader r(state, "virtio-" + device_->name());
  if (uint32_t version = r.pod<uint32_t>(); version != 1)
    throw SnapshotIncompatibleError("virtio transport state version " + std::to_string(version));
  std::lock_guard lock(mutex_);
  status_ = r.pod<uint32_t>();
  driver_features_ = r.pod<uint64_t>();
  queue_sel_ = r.pod<uint32_t>();
  interrupt_status_ = r.pod<uint32_t>();
  config_generation_ = r.pod<uint32_t>();
  if (r.pod<uint32_t>() != queues_.size()) throw SnapshotIncompatibleError("virtio queue count differs");
  for (Virtqueue& q : queues_) {
    auto rec = r.pod<QueueRecord>();
    q.size = rec.size;
    q.ready = rec.ready;
    q.desc_gpa = rec.desc, q.driver_gpa = rec.driver, q.device_gpa = rec.device;
    q.set_indices(rec.next_avail, rec.next_used);
  }
  device_->restore_state(r.sized());
  r.expect_end();
  if (driver_ok_locked()) device_->activate(*this);  // live queues: hook the device back to its host side
}

}  // namespace cellvm
