// An Intel MultiProcessor Specification 1.4 table: how a guest without ACPI
// (ours has none) learns how many CPUs it has and where the I/O APIC is.
// Linux scans for the floating pointer in 16-byte steps, first in the first
// KiB of memory, and each step maps and unmaps the fixmap (two PTE writes,
// two trapped INVLPGs, ~5 VM exits): at the end of base memory it cost 64
// fruitless steps of the first KiB, about 300 exits (6 ms) per boot. So the
// floating pointer sits at GPA 0, where the first step finds it (a 64-bit
// boot has no real-mode interrupt table, and Linux reserves page 0); the
// configuration table it points to stays in the last KiB below 640 KiB.
#pragma once

#include <cstdint>

namespace cellvm {

class GuestMemory;

inline constexpr uint64_t kMpFloatingPointer = 0;  // 16 bytes
inline constexpr uint64_t kMpTableStart = 0x9fc00;  // last KiB below 640 KiB; e820 leaves it out
inline constexpr uint64_t kMpTableEnd = 0xa0000;
inline constexpr uint64_t kIoApicAddress = 0xfec00000;
inline constexpr uint64_t kLocalApicAddress = 0xfee00000;

void write_mptable(GuestMemory& memory, int vcpus);

}  // namespace cellvm
