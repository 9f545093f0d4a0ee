#include "devices/i8042.h"

#include <cstring>

namespace cellvm {

namespace {
constexpr uint64_t kCommand = 4;
constexpr uint8_t kPulseResetLine = 0xfe;
}  // namespace

void I8042::read(uint64_t, uint8_t* data, uint32_t len, int) {
  std::memset(data, 0, len);  // status 0: output buffer empty, input buffer ready
}

void I8042::write(uint64_t offset, const uint8_t* data, uint32_t len, int) {
  if (offset == kCommand && len >= 1 && data[0] == kPulseResetLine) platform_.guest_exit(0);
}

}  // namespace cellvm
