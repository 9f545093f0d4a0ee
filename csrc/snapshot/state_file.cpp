#include "snapshot/state_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "common/errors.h"
#include "common/fd.h"

namespace cellvm {

namespace {
constexpr char kMagic[8] = {'C', 'E', 'L', 'L', 'V', 'M', 'S', 'S'};
}

uint64_t fnv1a(const uint8_t* data, size_t len, uint64_t hash) {
  for (size_t i = 0; i < len; ++i) {
    hash ^= data[i];
    hash *= 0x100000001b3ull;
  }
  return hash;
}

const Blob& StateFile::get(const std::string& name) const {
  auto it = sections_.find(name);
  if (it == sections_.end()) throw SnapshotCorruptError("snapshot state has no section " + name);
  return it->second;
}

void StateFile::write(const std::string& path) const {
  BlobWriter w;
  w.bytes(kMagic, sizeof kMagic).pod(kSnapshotFormatVersion).pod(static_cast<uint32_t>(sections_.size()));
  for (const auto& [name, blob] : sections_) {
    w.pod(static_cast<uint32_t>(name.size())).bytes(name.data(), name.size());
    w.pod(static_cast<uint64_t>(blob.size())).bytes(blob.data(), blob.size());
  }
  Blob out = w.take();
  uint64_t hash = fnv1a(out.data(), out.size());
  out.insert(out.end(), reinterpret_cast<uint8_t*>(&hash), reinterpret_cast<uint8_t*>(&hash) + sizeof hash);

  std::string tmp = path + ".tmp";
  UniqueFd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (!fd) throw HypervisorError::from_errno("open(" + tmp + ")");
  for (size_t done = 0; done < out.size();) {
    ssize_t n = ::write(fd.get(), out.data() + done, out.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) throw HypervisorError::from_errno("write(" + tmp + ")");
    done += n;
  }
  if (::fsync(fd.get()) < 0) throw HypervisorError::from_errno("fsync(" + tmp + ")");
  fd.reset();
  if (::rename(tmp.c_str(), path.c_str()) < 0) throw HypervisorError::from_errno("rename(" + path + ")");
}

StateFile StateFile::read(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) throw SnapshotCorruptError("cannot open snapshot state " + path + ": " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd.get(), &st) < 0) throw SnapshotCorruptError("cannot stat " + path);
  Blob data(st.st_size);
  for (size_t done = 0; done < data.size();) {
    ssize_t n = ::pread(fd.get(), data.data() + done, data.size() - done, done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) throw SnapshotCorruptError("cannot read " + path);
    done += n;
  }
  if (data.size() < sizeof kMagic + 8 + 8 || std::memcmp(data.data(), kMagic, sizeof kMagic) != 0)
    throw SnapshotCorruptError(path + " is not a cellvm snapshot state file (or is truncated)");
  uint32_t version;
  std::memcpy(&version, data.data() + sizeof kMagic, sizeof version);
  if (version != kSnapshotFormatVersion)
    throw SnapshotIncompatibleError(path + " has snapshot format " + std::to_string(version) + ", this cellvm reads " +
                                    std::to_string(kSnapshotFormatVersion));
  uint64_t stored;
  std::memcpy(&stored, data.data() + data.size() - sizeof stored, sizeof stored);
  data.resize(data.size() - sizeof stored);
  if (fnv1a(data.data(), data.size()) != stored)
    throw SnapshotCorruptError(path + " fails its checksum (corrupt or truncated)");

  BlobReader r(data, path);
  Blob skip(sizeof kMagic + sizeof version);
  r.bytes(skip.data(), skip.size());
  uint32_t count = r.pod<uint32_t>();
  StateFile file;
  for (uint32_t i = 0; i < count; ++i) {
    std::string name(r.length<uint32_t>(), '\0');
    r.bytes(name.data(), name.size());
    file.sections_[name] = r.sized();
  }
  r.expect_end();
  return file;
}

BlobWriter& BlobWriter::bytes(const void* data, size_t len) {
  const auto* p = static_cast<const uint8_t*>(data);
  blob_.insert(blob_.end(), p, p + len);
  return *this;
}

BlobWriter& BlobWriter::sized(const void* data, size_t len) {
  return pod(static_cast<uint64_t>(len)).bytes(data, len);
}

void BlobReader::bytes(void* out, size_t len) {
  if (len > blob_.size() - pos_) throw SnapshotCorruptError(what_ + ": record runs past the end");
  std::memcpy(out, blob_.data() + pos_, len);
  pos_ += len;
}

void BlobReader::sized_exact(void* out, size_t len) {
  uint64_t stored = pod<uint64_t>();
  if (stored != len)
    throw SnapshotIncompatibleError(what_ + ": record of " + std::to_string(stored) + " bytes where " +
                                    std::to_string(len) + " are expected (saved by another KVM/cellvm version)");
  bytes(out, len);
}

Blob BlobReader::sized() {
  Blob blob(length<uint64_t>());
  bytes(blob.data(), blob.size());
  return blob;
}

void BlobReader::expect_end() const {
  if (pos_ != blob_.size()) throw SnapshotCorruptError(what_ + ": trailing bytes");
}

}  // namespace cellvm
