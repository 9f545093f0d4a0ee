// Loads the PT_LOAD segments of an x86-64 ELF executable (a test guest, or
// vmlinux) into guest memory at their physical addresses.
#pragma once

#include <cstdint>
#include <string>

namespace cellvm {

class GuestMemory;

struct LoadedElf {
  uint64_t entry;       // e_entry (physical for vmlinux: ENTRY(phys_startup_64))
  uint64_t lowest;      // lowest physical address written
  uint64_t highest;     // end of the highest segment (memsz)
};

// Throws std::invalid_argument for a file that is not a loadable x86-64 ELF or
// whose segments fall outside guest memory.
LoadedElf load_elf(GuestMemory& memory, const std::string& path);

}  // namespace cellvm
