// Guest memory on disk: sparse files that a restore maps MAP_PRIVATE, so
// pages load lazily, writes are copy-on-write and every VM restored from one
// snapshot shares the page cache.
//
// A full image holds every page the guest touched, at its own offset (holes
// read as zero). A diff image holds only the pages written since the machine
// was restored; a restore maps the parent chain and then each diff's data
// extents over it, oldest first.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "common/fd.h"

namespace cellvm {

struct MemoryWriteStats {
  uint64_t pages_written = 0;
  uint64_t bytes_written = 0;
};

// The machine's own pages, from /proc/self/pagemap: present and not file
// pages. For a MAP_PRIVATE mapping of images, those written since it was
// mapped (copy-on-write made them anonymous): a diff, catching guest and VMM
// writes alike with no dirty logging slowing the guest down. For a fresh
// machine's anonymous RAM, every page it ever touched: a full image.
// `unchanged(page)`, when given, names private pages to leave out anyway
// (copied ahead by a working set and never changed).
MemoryWriteStats write_diff_memory(const uint8_t* host, uint64_t size, const std::string& path,
                                   const std::function<bool(uint64_t)>& unchanged = {});

// Maps `layers` (a full image, then diffs, oldest first) MAP_PRIVATE as one
// range of `size` bytes. Throws SnapshotCorruptError if a layer's size is not
// `size` (truncated).
Mapping map_memory_layers(const std::vector<std::string>& layers, uint64_t size);
// The same, MAP_FIXED over the `size` bytes at `at` that the caller owns
// (a prepared machine's RAM, already under its memslot: vm/vm_pool.h).
// All layers are opened and size-checked before anything is mapped.
void map_memory_layers_over(const std::vector<std::string>& layers, uint64_t size, void* at);

// Writes the composition of `layers` as one full image (flattening a chain).
MemoryWriteStats flatten_memory_layers(const std::vector<std::string>& layers, uint64_t size, const std::string& path);

}  // namespace cellvm
