#include "vm/mptable.h"

#include <cstring>
#include <stdexcept>
#include <vector>

#include "vm/memory.h"

namespace cellvm {

namespace {

constexpr int kIoApicPins = 24;
constexpr uint8_t kEntryProcessor = 0, kEntryBus = 1, kEntryIoApic = 2, kEntryIoInterrupt = 3, kEntryLocalInterrupt = 4;
constexpr uint8_t kInterruptInt = 0, kInterruptNmi = 1, kInterruptExtInt = 3;

// Entries are packed little-endian records; build them byte by byte.
class Writer {
 public:
  void u8(uint8_t v) { bytes.push_back(v); }
  void u16(uint16_t v) { u8(v & 0xff), u8(v >> 8); }
  void u32(uint32_t v) { u16(v & 0xffff), u16(v >> 16); }
  void text(const char* s, size_t n) {
    for (size_t i = 0; i < n; ++i) u8(s[i]);
  }
  std::vector<uint8_t> bytes;
};

uint8_t checksum(const uint8_t* data, size_t len) {
  uint8_t sum = 0;
  for (size_t i = 0; i < len; ++i) sum += data[i];
  return static_cast<uint8_t>(-sum);
}

}  // namespace

void write_mptable(GuestMemory& memory, int vcpus) {
  const uint8_t ioapic_id = static_cast<uint8_t>(vcpus);
  Writer entries;
  for (int i = 0; i < vcpus; ++i) {
    entries.u8(kEntryProcessor);
    entries.u8(i);                         // local APIC ID = vCPU index
    entries.u8(0x14);                      // local APIC version
    entries.u8(i == 0 ? 0x3 : 0x1);        // enabled, BSP
    entries.u32(0x600);                    // CPU signature (family 6)
    entries.u32(0x201);                    // features: FPU, APIC
    entries.u32(0), entries.u32(0);
  }
  entries.u8(kEntryBus);
  entries.u8(0);
  entries.text("ISA   ", 6);
  entries.u8(kEntryIoApic);
  entries.u8(ioapic_id);
  entries.u8(0x11);  // I/O APIC version
  entries.u8(1);     // enabled
  entries.u32(kIoApicAddress);
  for (int pin = 0; pin < kIoApicPins; ++pin) {
    entries.u8(kEntryIoInterrupt);
    entries.u8(kInterruptInt);
    entries.u16(0);  // polarity and trigger conform to the bus
    entries.u8(0);   // ISA
    entries.u8(pin);
    entries.u8(ioapic_id);
    entries.u8(pin);
  }
  for (auto [type, lint] : {std::pair{kInterruptExtInt, 0}, std::pair{kInterruptNmi, 1}}) {
    entries.u8(kEntryLocalInterrupt);
    entries.u8(type);
    entries.u16(0);
    entries.u8(0);
    entries.u8(0);
    entries.u8(0xff);  // every local APIC
    entries.u8(lint);
  }
  const int entry_count = vcpus + 2 + kIoApicPins + 2;

  constexpr size_t kHeaderSize = 44;
  const uint64_t config_gpa = kMpTableStart;
  Writer config;
  config.text("PCMP", 4);
  config.u16(kHeaderSize + entries.bytes.size());
  config.u8(4);  // spec revision 1.4
  config.u8(0);  // checksum, below
  config.text("CELLVM  ", 8);
  config.text("MICROVM     ", 12);
  config.u32(0), config.u16(0);
  config.u16(entry_count);
  config.u32(kLocalApicAddress);
  config.u16(0), config.u8(0), config.u8(0);
  config.bytes.insert(config.bytes.end(), entries.bytes.begin(), entries.bytes.end());
  config.bytes[7] = checksum(config.bytes.data(), config.bytes.size());

  Writer floating;
  floating.text("_MP_", 4);
  floating.u32(config_gpa);
  floating.u8(1);  // length in 16-byte units
  floating.u8(4);  // spec revision 1.4
  floating.u8(0);  // checksum, below
  for (int i = 0; i < 5; ++i) floating.u8(0);  // features: a configuration table is present
  floating.bytes[10] = checksum(floating.bytes.data(), floating.bytes.size());

  if (config_gpa + config.bytes.size() > kMpTableEnd) throw std::length_error("MP table does not fit below 640 KiB");
  memory.write(kMpFloatingPointer, floating.bytes.data(), floating.bytes.size());
  memory.write(config_gpa, config.bytes.data(), config.bytes.size());
}

}  // namespace cellvm
