#include "devices/serial.h"

namespace cellvm {

namespace {
// Register offsets and bits of the 16550A (only what this model uses).
constexpr uint8_t kThrRbr = 0, kIer = 1, kIirFcr = 2, kLcr = 3, kMcr = 4, kLsr = 5, kMsr = 6, kScr = 7;
constexpr uint8_t kLcrDlab = 0x80;
constexpr uint8_t kIerThri = 0x02;
constexpr uint8_t kIirNoInterrupt = 0x01, kIirThri = 0x02, kIirFifoEnabled = 0xc0;
constexpr uint8_t kLsrThrEmpty = 0x20, kLsrTransmitterEmpty = 0x40;
constexpr uint8_t kMcrLoop = 0x10;
}  // namespace

void Serial::read(uint64_t offset, uint8_t* data, uint32_t len, int) {
  std::lock_guard lock(mutex_);
  uint8_t value = 0;
  switch (offset) {
    case kThrRbr: value = (lcr_ & kLcrDlab) ? dll_ : 0; break;
    case kIer: value = (lcr_ & kLcrDlab) ? dlm_ : ier_; break;
    case kIirFcr:
      value = (fcr_ & 1) ? kIirFifoEnabled : 0;
      if (thr_interrupt_pending_ && (ier_ & kIerThri)) {
        value |= kIirThri;
        thr_interrupt_pending_ = false;  // reading IIR acknowledges THRE
      } else {
        value |= kIirNoInterrupt;
      }
      break;
    case kLcr: value = lcr_; break;
    case kMcr: value = mcr_; break;
    case kLsr: value = kLsrThrEmpty | kLsrTransmitterEmpty; break;
    // Loopback mirrors MCR's outputs into MSR's inputs (Linux probes this);
    // otherwise report carrier, data-set-ready and clear-to-send.
    case kMsr: value = (mcr_ & kMcrLoop) ? static_cast<uint8_t>((mcr_ & 0x0f) << 4) : 0xb0; break;
    case kScr: value = scr_; break;
  }
  for (uint32_t i = 0; i < len; ++i) data[i] = i == 0 ? value : 0;
  update_irq();
}

void Serial::write(uint64_t offset, const uint8_t* data, uint32_t len, int) {
  if (len == 0) return;
  uint8_t value = data[0];
  std::lock_guard lock(mutex_);
  switch (offset) {
    case kThrRbr:
      if (lcr_ & kLcrDlab) {
        dll_ = value;
      } else {
        if (!(mcr_ & kMcrLoop)) platform_.console_output(&value, 1);
        thr_interrupt_pending_ = true;
      }
      break;
    case kIer:
      if (lcr_ & kLcrDlab) {
        dlm_ = value;
      } else {
        // Enabling THRI with an empty transmitter raises the interrupt at once,
        // as on real hardware; Linux relies on it to start transmitting.
        if ((value & kIerThri) && !(ier_ & kIerThri)) thr_interrupt_pending_ = true;
        ier_ = value & 0x0f;
      }
      break;
    case kIirFcr: fcr_ = value; break;
    case kLcr: lcr_ = value; break;
    case kMcr: mcr_ = value & 0x1f; break;
    case kScr: scr_ = value; break;
    default: break;
  }
  update_irq();
}

namespace {
struct SerialStateV1 {
  uint32_t version;
  uint8_t ier, lcr, mcr, scr, fcr, dll, dlm, thr_interrupt_pending, irq_level;
};
}  // namespace

Blob Serial::save_state() const {
  std::lock_guard lock(mutex_);
  SerialStateV1 s{1, ier_, lcr_, mcr_, scr_, fcr_, dll_, dlm_, thr_interrupt_pending_, irq_level_};
  return BlobWriter().pod(s).take();
}

void Serial::restore_state(const Blob& state) {
  BlobReader reader(state, "serial state");
  auto s = reader.pod<SerialStateV1>();
  reader.expect_end();
  if (s.version != 1) throw SnapshotIncompatibleError("serial state version " + std::to_string(s.version));
  std::lock_guard lock(mutex_);
  ier_ = s.ier, lcr_ = s.lcr, mcr_ = s.mcr, scr_ = s.scr, fcr_ = s.fcr, dll_ = s.dll, dlm_ = s.dlm;
  thr_interrupt_pending_ = s.thr_interrupt_pending, irq_level_ = s.irq_level;
}

void Serial::update_irq() {
  bool level = thr_interrupt_pending_ && (ier_ & kIerThri);
  if (level != irq_level_) {
    irq_level_ = level;
    platform_.set_irq_line(kIrq, level);
  }
}

}  // namespace cellvm
