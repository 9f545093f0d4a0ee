// Booting Linux: the uncompressed vmlinux entered through the 64-bit boot
// protocol (Documentation/arch/x86/boot.rst, "64-bit BOOT PROTOCOL").
//
// Why not the PVH entry: PVH starts in 32-bit protected mode without paging,
// which this host's PVM can only emulate; the 64-bit entry (startup_64, the
// ELF entry point of vmlinux) starts in long mode with the VMM's identity
// page tables, exactly the state PVM runs well (PVM-HOST-FACTS.md section 4).
// The same entry works on hardware KVM. No bzImage: its decompressor runs
// emulated here and takes tens of seconds.
//
// Memory the VMM writes besides x86_boot.h's tables:
//   0x00000  MP floating pointer (16 bytes), see mptable.h
//   0x07000  boot_params ("zero page"): e820 map, command line and initrd pointers
//   0x20000  kernel command line
//   0x9fc00  MP table (CPU count, I/O APIC), see mptable.h
//   top of RAM (page aligned, below 3 GiB): the initrd
#pragma once

#include <cstdint>
#include <string>

#include "kvm/kvm_uapi.h"

namespace cellvm {

class GuestMemory;

struct LinuxBootInfo {
  uint64_t entry;        // physical address of startup_64
  uint64_t boot_params;  // GPA of the zero page, passed in RSI
};

inline constexpr uint64_t kBootParams = 0x7000;
inline constexpr uint64_t kCommandLine = 0x20000;
inline constexpr size_t kCommandLineMax = 4096;

// Loads vmlinux (and the initrd, if a path is given) and writes the zero
// page, command line, e820 map and MP table. Throws std::invalid_argument
// for files that do not fit or are not what they claim to be.
LinuxBootInfo load_linux(GuestMemory& memory, int vcpus, const std::string& vmlinux,
                         const std::string& initrd, const std::string& cmdline);

}  // namespace cellvm
