#include "snapshot/memory_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <functional>

#include "common/errors.h"
#include "snapshot/state_file.h"

namespace cellvm {

namespace {

constexpr uint64_t kPage = 4096;
constexpr uint64_t kPagemapPresent = 1ull << 63;
constexpr uint64_t kPagemapFileOrShared = 1ull << 61;

// Calls visit(offset, length) for each data extent of fd within [0, size).
void for_each_data_extent(int fd, uint64_t size, const std::function<void(uint64_t, uint64_t)>& visit) {
  off_t pos = 0;
  while (static_cast<uint64_t>(pos) < size) {
    off_t data = ::lseek(fd, pos, SEEK_DATA);
    if (data < 0) {
      if (errno == ENXIO) return;  // nothing but a hole after pos
      throw HypervisorError::from_errno("lseek(SEEK_DATA)");
    }
    off_t hole = ::lseek(fd, data, SEEK_HOLE);
    if (hole < 0) throw HypervisorError::from_errno("lseek(SEEK_HOLE)");
    uint64_t end = std::min<uint64_t>(hole, size);
    if (static_cast<uint64_t>(data) >= end) return;
    visit(data, end - data);
    pos = hole;
  }
}

class SparseImageWriter {
 public:
  SparseImageWriter(const std::string& path, uint64_t size) : path_(path), tmp_(path + ".tmp") {
    fd_.reset(::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    if (!fd_) throw HypervisorError::from_errno("open(" + tmp_ + ")");
    if (::ftruncate(fd_.get(), size) < 0) throw HypervisorError::from_errno("ftruncate(" + tmp_ + ")");
  }
  void write(const uint8_t* data, uint64_t offset, uint64_t len) {
    for (uint64_t done = 0; done < len;) {
      ssize_t n = ::pwrite(fd_.get(), data + done, len - done, offset + done);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) throw HypervisorError::from_errno("write(" + tmp_ + ")");
      done += n;
    }
    stats.bytes_written += len;
    stats.pages_written += (len + kPage - 1) / kPage;
  }
  MemoryWriteStats commit() {
    if (::fsync(fd_.get()) < 0) throw HypervisorError::from_errno("fsync(" + tmp_ + ")");
    // Drops the image's page cache, which write() filled with small folios:
    // restores then read it back in 2 MiB folios (map_layers) that the host
    // and KVM can map whole. Advice only (tmpfs ignores it).
    ::posix_fadvise(fd_.get(), 0, 0, POSIX_FADV_DONTNEED);
    fd_.reset();
    if (::rename(tmp_.c_str(), path_.c_str()) < 0) throw HypervisorError::from_errno("rename(" + path_ + ")");
    return stats;
  }
  MemoryWriteStats stats;

 private:
  std::string path_, tmp_;
  UniqueFd fd_;
};

UniqueFd open_layer(const std::string& path, uint64_t size) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) throw SnapshotCorruptError("cannot open memory image " + path + ": " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd.get(), &st) < 0) throw SnapshotCorruptError("cannot stat " + path);
  if (static_cast<uint64_t>(st.st_size) != size)
    throw SnapshotCorruptError("memory image " + path + " has " + std::to_string(st.st_size) + " bytes, expected " +
                               std::to_string(size) + " (truncated?)");
  return fd;
}

}  // namespace

MemoryWriteStats write_diff_memory(const uint8_t* host, uint64_t size, const std::string& path,
                                   const std::function<bool(uint64_t)>& unchanged) {
  UniqueFd pagemap(::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC));
  if (!pagemap) throw HypervisorError::from_errno("open(/proc/self/pagemap)");
  SparseImageWriter out(path, size);
  const uint64_t pages = size / kPage;
  const uint64_t first = reinterpret_cast<uintptr_t>(host) / kPage;
  std::vector<uint64_t> entries(4096);
  uint64_t run_start = 0, run_len = 0;  // coalesce neighbouring dirty pages into one write
  auto flush = [&] {
    if (run_len) out.write(host + run_start * kPage, run_start * kPage, run_len * kPage);
    run_len = 0;
  };
  for (uint64_t base = 0; base < pages; base += entries.size()) {
    uint64_t n = std::min<uint64_t>(entries.size(), pages - base);
    ssize_t got = ::pread(pagemap.get(), entries.data(), n * 8, (first + base) * 8);
    if (got != static_cast<ssize_t>(n * 8)) throw HypervisorError::from_errno("read(/proc/self/pagemap)");
    for (uint64_t i = 0; i < n; ++i) {
      bool dirty = (entries[i] & kPagemapPresent) && !(entries[i] & kPagemapFileOrShared);
      if (dirty && unchanged && unchanged(base + i)) dirty = false;
      if (dirty && run_len && run_start + run_len == base + i) {
        ++run_len;
      } else if (dirty) {
        flush();
        run_start = base + i;
        run_len = 1;
      }
    }
  }
  flush();
  return out.commit();
}

namespace {

// Opens and size-checks every layer first, so a bad layer fails before
// anything is mapped; then the base MAP_FIXED-or-not, then each diff's data
// extents over it, oldest first.
void* map_layers(const std::vector<std::string>& layers, uint64_t size, void* at) {
  if (layers.empty()) throw std::invalid_argument("no memory image to map");
  std::vector<UniqueFd> fds;
  fds.reserve(layers.size());
  for (const std::string& layer : layers) fds.push_back(open_layer(layer, size));
  Mapping owned;  // unmapped on a throw below, unless the caller owns the range
  if (!at) {
    at = map_anonymous_huge_aligned(size);
    if (at == MAP_FAILED) throw HypervisorError::from_errno("mmap(restored guest ram)");
    owned = Mapping(at, size);
  }
  void* addr = ::mmap(at, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE | MAP_FIXED, fds[0].get(), 0);
  if (addr == MAP_FAILED) throw HypervisorError::from_errno("mmap(" + layers[0] + ")");
  // Lets the host map the image's page cache in 2 MiB pieces (read faults
  // then read it in 2 MiB folios), and KVM follows the host: a block of
  // guest memory only read after the restore (kernel text, page cache) costs
  // one shadow fault instead of one per 4 KiB page that is touched. Restore to
  // the first byte of `echo hi`: 446 -> 46 shadow faults on kernel text.
  // Written pages still split their block (the COW), so a working set
  // (write_working_set) copies the rest of such blocks ahead.
  ::madvise(addr, size, MADV_HUGEPAGE);
  for (size_t i = 1; i < layers.size(); ++i) {
    for_each_data_extent(fds[i].get(), size, [&](uint64_t offset, uint64_t len) {
      void* to = static_cast<uint8_t*>(addr) + offset;
      if (::mmap(to, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED | MAP_NORESERVE, fds[i].get(), offset) ==
          MAP_FAILED)
        throw HypervisorError::from_errno("mmap(" + layers[i] + ")");
    });
  }
  owned.release();
  return addr;
}

}  // namespace

Mapping map_memory_layers(const std::vector<std::string>& layers, uint64_t size) {
  return Mapping(map_layers(layers, size, nullptr), size);
}

void map_memory_layers_over(const std::vector<std::string>& layers, uint64_t size, void* at) {
  if (at == nullptr) throw std::invalid_argument("map_memory_layers_over: no address");
  map_layers(layers, size, at);
}

MemoryWriteStats flatten_memory_layers(const std::vector<std::string>& layers, uint64_t size, const std::string& path) {
  SparseImageWriter out(path, size);
  std::vector<uint8_t> buffer(1 << 20);
  for (const std::string& layer : layers) {
    UniqueFd fd = open_layer(layer, size);
    for_each_data_extent(fd.get(), size, [&](uint64_t offset, uint64_t len) {
      for (uint64_t done = 0; done < len;) {
        uint64_t chunk = std::min<uint64_t>(buffer.size(), len - done);
        ssize_t n = ::pread(fd.get(), buffer.data(), chunk, offset + done);
        if (n <= 0) throw SnapshotCorruptError("cannot read " + layer);
        out.write(buffer.data(), offset + done, n);
        done += n;
      }
    });
  }
  MemoryWriteStats stats = out.commit();
  return stats;
}

}  // namespace cellvm
