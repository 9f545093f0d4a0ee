// An Intel MultiProcessor Specification 1.4 table: how a guest without ACPI
// (ours has none) learns how many CPUs it has and where the I/O APIC is.
// Linux finds the floating pointer by scanning the last KiB of base memory.
#pragma once

#include <cstdint>

namespace cellvm {

class GuestMemory;

inline constexpr uint64_t kMpTableStart = 0x9fc00;  // last KiB below 640 KiB; e820 leaves it out
inline constexpr uint64_t kMpTableEnd = 0xa0000;
inline constexpr uint64_t kIoApicAddress = 0xfec00000;
inline constexpr uint64_t kLocalApicAddress = 0xfee00000;

void write_mptable(GuestMemory& memory, int vcpus);

}  // namespace cellvm
