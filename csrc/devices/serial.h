// A 16550A UART at the legacy COM1 ports (0x3f8, IRQ 4): the guest console.
// Transmit only: every byte written to THR goes to the machine's console at
// once, so the transmitter is always empty; receive is never ready.
#pragma once

#include <mutex>

#include "devices/device.h"

namespace cellvm {

class Serial : public Device {
 public:
  static constexpr uint16_t kBase = 0x3f8;
  static constexpr uint32_t kIrq = 4;

  explicit Serial(Platform& platform) : platform_(platform) {}
  std::string name() const override { return "serial"; }
  void read(uint64_t offset, uint8_t* data, uint32_t len, int vcpu) override;
  void write(uint64_t offset, const uint8_t* data, uint32_t len, int vcpu) override;
  Blob save_state() const override;
  void restore_state(const Blob& state) override;

 private:
  void update_irq();  // with mutex_ held

  Platform& platform_;
  mutable std::mutex mutex_;
  uint8_t ier_ = 0, lcr_ = 0, mcr_ = 0, scr_ = 0, fcr_ = 0, dll_ = 0x0c, dlm_ = 0;
  bool thr_interrupt_pending_ = false;  // set on THR write / IER enable, cleared by reading IIR
  bool irq_level_ = false;
};

}  // namespace cellvm
