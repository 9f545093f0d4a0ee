#include "devices/virtio_blk.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>

#include "devices/virtio/mmio.h"

namespace cellvm {

namespace {

constexpr uint64_t kSector = 512;
constexpr uint64_t kFeatureSegMax = 1ull << 2, kFeatureReadOnly = 1ull << 5, kFeatureFlush = 1ull << 9;
constexpr uint32_t kSegMax = Virtqueue::kMaxSize - 2;  // header and status take two descriptors
constexpr uint32_t kTypeIn = 0, kTypeOut = 1, kTypeFlush = 4, kTypeGetId = 8;
constexpr uint8_t kStatusOk = 0, kStatusIoErr = 1, kStatusUnsupported = 2;

struct RequestHeader {
  uint32_t type;
  uint32_t reserved;
  uint64_t sector;
};

}  // namespace

VirtioBlk::VirtioBlk(const std::string& path, bool read_only) : path_(path), read_only_(read_only) {
  fd_.reset(::open(path.c_str(), (read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC));
  if (!fd_) throw std::invalid_argument("cannot open disk image " + path + ": " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd_.get(), &st) < 0) throw std::invalid_argument("cannot stat disk image " + path);
  sectors_ = st.st_size / kSector;
}

uint64_t VirtioBlk::features() const { return kFeatureSegMax | kFeatureFlush | (read_only_ ? kFeatureReadOnly : 0); }

void VirtioBlk::read_config(uint64_t offset, uint8_t* data, uint32_t len) {
  // struct virtio_blk_config: u64 capacity @0, u32 size_max @8, u32 seg_max @12
  uint8_t config[16] = {};
  std::memcpy(config, &sectors_, 8);
  std::memcpy(config + 12, &kSegMax, 4);
  std::memset(data, 0, len);
  if (offset < sizeof config) std::memcpy(data, config + offset, std::min<uint64_t>(len, sizeof config - offset));
}

uint8_t VirtioBlk::handle(DescriptorChain& chain, uint32_t* written) {
  RequestHeader header{};
  if (chain.buffers.size() < 2 || chain.read(&header, sizeof header) != sizeof header) return kStatusIoErr;
  // The last buffer is the status byte; data buffers lie between.
  GuestBuffer status = chain.buffers.back();
  if (!status.device_writable || status.len < 1) return kStatusIoErr;
  chain.buffers.pop_back();
  uint64_t offset = header.sector * kSector;
  switch (header.type) {
    case kTypeIn:
    case kTypeOut: {
      bool in = header.type == kTypeIn;
      if (!in && read_only_) return kStatusIoErr;
      size_t skip = sizeof header;  // the header sits in the first readable bytes
      for (GuestBuffer& b : chain.buffers) {
        uint8_t* data = b.data;
        uint32_t len = b.len;
        if (!b.device_writable) {
          size_t s = std::min<size_t>(skip, len);
          skip -= s, data += s, len -= s;
          if (in || len == 0) continue;
        } else if (!in) {
          continue;
        }
        if (offset / kSector > sectors_ || len > (sectors_ - offset / kSector) * kSector) return kStatusIoErr;
        for (uint32_t done = 0; done < len;) {
          ssize_t n = in ? ::pread(fd_.get(), data + done, len - done, offset + done)
                         : ::pwrite(fd_.get(), data + done, len - done, offset + done);
          if (n < 0 && errno == EINTR) continue;
          if (n <= 0) return kStatusIoErr;
          done += n;
        }
        offset += len;
        if (in) *written += len;
      }
      return kStatusOk;
    }
    case kTypeFlush:
      return ::fdatasync(fd_.get()) == 0 || read_only_ ? kStatusOk : kStatusIoErr;
    case kTypeGetId: {
      char id[20] = "cellvm-disk";
      *written += chain.write(id, sizeof id);
      return kStatusOk;
    }
    default:
      return kStatusUnsupported;
  }
}

void VirtioBlk::process_queue(VirtioTransport& transport, int queue) {
  Virtqueue& q = transport.queue(queue);
  bool used = false;
  while (auto chain = q.pop(transport.memory())) {
    GuestBuffer status = chain->buffers.back();
    uint32_t written = 0;
    uint8_t result = handle(*chain, &written);
    if (status.device_writable && status.len >= 1) {
      *status.data = result;
      ++written;
    }
    q.push_used(transport.memory(), chain->head, written);
    used = true;
  }
  if (used) transport.notify_used(queue);
}

}  // namespace cellvm
