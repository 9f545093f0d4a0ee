#include "devices/testdev.h"

#include <cstring>

namespace cellvm {

namespace {
constexpr uint64_t kConsole = 0x000, kExit = 0x008, kMark = 0x010, kSink = 0x018, kReports = 0x100;
}

void TestDevice::read(uint64_t offset, uint8_t* data, uint32_t len, int) {
  uint64_t value = 0;
  if (offset >= kReports && offset < kReports + 8 * kMaxVcpus) {
    std::lock_guard lock(mutex_);
    value = reports_[(offset - kReports) / 8].last;
  }
  std::memset(data, 0, len);
  std::memcpy(data, &value, std::min<uint32_t>(len, sizeof value));
}

void TestDevice::write(uint64_t offset, const uint8_t* data, uint32_t len, int vcpu) {
  uint64_t value = 0;
  std::memcpy(&value, data, std::min<uint32_t>(len, sizeof value));
  switch (offset) {
    case kConsole: {
      uint8_t byte = value & 0xff;
      platform_.console_output(&byte, 1);
      return;
    }
    case kExit: platform_.guest_exit(static_cast<int64_t>(value)); return;
    case kMark: {
      std::lock_guard lock(mutex_);
      marks_.push_back({value, vcpu, std::chrono::steady_clock::now()});
      return;
    }
    case kSink: return;
  }
  if (offset >= kReports && offset < kReports + 8 * kMaxVcpus) {
    std::lock_guard lock(mutex_);
    Report& r = reports_[(offset - kReports) / 8];
    r.last = value;
    ++r.count;
  }
}

// The reports, so a restored guest's counts continue where they were; the
// mark log is the host's measurement of one run and starts empty.
Blob TestDevice::save_state() const {
  std::lock_guard lock(mutex_);
  return BlobWriter().pod(uint32_t{1}).pod(reports_).take();
}

void TestDevice::restore_state(const Blob& state) {
  BlobReader reader(state, "testdev state");
  if (uint32_t version = reader.pod<uint32_t>(); version != 1)
    throw SnapshotIncompatibleError("testdev state version " + std::to_string(version));
  std::lock_guard lock(mutex_);
  reader.bytes(reports_, sizeof reports_);
  reader.expect_end();
}

std::vector<TestDevice::Report> TestDevice::reports() const {
  std::lock_guard lock(mutex_);
  return {std::begin(reports_), std::end(reports_)};
}

std::vector<TestDevice::Mark> TestDevice::marks() const {
  std::lock_guard lock(mutex_);
  return marks_;
}

}  // namespace cellvm
