// The snapshot state file: named binary sections with one checksum. It
// knows no device and no vCPU: the machine hands it blobs by name
// ("vcpu.0", "vm.clock", "device.serial", ...) and gets them back.
//
// Layout (little-endian):
//   "CELLVMSS" | u32 format version | u32 section count
//   per section: u32 name length | name | u64 payload length | payload
//   u64 FNV-1a hash of everything before it
// Written to a temporary name, fsynced, then renamed: a reader never sees a
// partial file under the final name.
#pragma once

#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace cellvm {

inline constexpr uint32_t kSnapshotFormatVersion = 1;

class SnapshotCorruptError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};
class SnapshotIncompatibleError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

using Blob = std::vector<uint8_t>;

class StateFile {
 public:
  void put(const std::string& name, Blob blob) { sections_[name] = std::move(blob); }
  bool has(const std::string& name) const { return sections_.count(name) != 0; }
  // Throws SnapshotCorruptError if the section is missing.
  const Blob& get(const std::string& name) const;

  void write(const std::string& path) const;
  // Throws SnapshotCorruptError (truncated, bad checksum, unparsable) or
  // SnapshotIncompatibleError (another format version).
  static StateFile read(const std::string& path);

 private:
  std::map<std::string, Blob> sections_;
};

// Appends and reads fixed-layout values to and from a blob.
class BlobWriter {
 public:
  template <class T>
  BlobWriter& pod(const T& value) {
    static_assert(std::is_trivially_copyable_v<T>);
    return bytes(&value, sizeof value);
  }
  BlobWriter& bytes(const void* data, size_t len);
  // Length-prefixed, so a reader can check the size it expects.
  BlobWriter& sized(const void* data, size_t len);
  Blob take() { return std::move(blob_); }

 private:
  Blob blob_;
};

class BlobReader {
 public:
  BlobReader(const Blob& blob, std::string what) : blob_(blob), what_(std::move(what)) {}
  template <class T>
  T pod() {
    static_assert(std::is_trivially_copyable_v<T>);
    T value;
    bytes(&value, sizeof value);
    return value;
  }
  void bytes(void* out, size_t len);
  // A length field, checked against what is left before anyone allocates it.
  template <class T>
  size_t length() {
    T len = pod<T>();
    if (len > blob_.size() - pos_) throw SnapshotCorruptError(what_ + ": length field runs past the end");
    return len;
  }
  // A sized() record that must be exactly `len` bytes (a kernel header of
  // another version would change it: that is incompatible, not corrupt).
  void sized_exact(void* out, size_t len);
  Blob sized();
  void expect_end() const;

 private:
  const Blob& blob_;
  std::string what_;
  size_t pos_ = 0;
};

uint64_t fnv1a(const uint8_t* data, size_t len, uint64_t hash = 0xcbf29ce484222325ull);

}  // namespace cellvm
