#include "vm/linux_boot.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "common/fd.h"
#include "vm/elf.h"
#include "vm/memory.h"
#include "vm/mptable.h"
#include "vm/x86_boot.h"

namespace cellvm {

namespace {

// Offsets into struct boot_params (arch/x86/include/uapi/asm/bootparam.h).
constexpr uint64_t kE820Entries = 0x1e8, kBootFlag = 0x1fe, kHeader = 0x202, kVersion = 0x206,
                   kTypeOfLoader = 0x210, kLoadFlags = 0x211, kRamdiskImage = 0x218, kRamdiskSize = 0x21c,
                   kCmdLinePtr = 0x228, kKernelAlignment = 0x230, kCmdlineSize = 0x238, kE820Table = 0x2d0;
constexpr uint32_t kE820Ram = 1, kE820Reserved = 2;
constexpr uint8_t kLoadedHigh = 0x01;
constexpr uint64_t kHighMemory = 0x100000;

void add_e820(GuestMemory& memory, int& count, uint64_t start, uint64_t size, uint32_t type) {
  uint64_t entry = kBootParams + kE820Table + 20 * count++;
  memory.store<uint64_t>(entry, start);
  memory.store<uint64_t>(entry + 8, size);
  memory.store<uint32_t>(entry + 16, type);
}

uint64_t load_initrd(GuestMemory& memory, const std::string& path, uint64_t lowest_allowed, uint64_t* size_out) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) throw std::invalid_argument("cannot open initrd " + path + ": " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd.get(), &st) < 0) throw std::invalid_argument("cannot stat initrd " + path);
  uint64_t size = st.st_size;
  uint64_t gpa = (memory.size() - size) & ~0xfffull;
  if (size == 0 || size > memory.size() || gpa < lowest_allowed)
    throw std::invalid_argument("initrd " + path + " (" + std::to_string(size) + " bytes) does not fit in guest memory");
  uint8_t* dest = memory.at(gpa, size);
  for (uint64_t done = 0; done < size;) {
    ssize_t n = ::pread(fd.get(), dest + done, size - done, done);
    if (n <= 0) throw std::invalid_argument("cannot read initrd " + path);
    done += n;
  }
  *size_out = size;
  return gpa;
}

}  // namespace

LinuxBootInfo load_linux(GuestMemory& memory, int vcpus, const std::string& vmlinux, const std::string& initrd,
                         const std::string& cmdline) {
  if (cmdline.size() + 1 > kCommandLineMax) throw std::invalid_argument("kernel command line too long");
  x86::write_boot_tables(memory, vcpus);
  LoadedElf kernel = load_elf(memory, vmlinux);
  if (kernel.lowest < kHighMemory) throw std::invalid_argument(vmlinux + ": loads below 1 MiB, not a vmlinux");

  std::memset(memory.at(kBootParams, 0x1000), 0, 0x1000);
  memory.store<uint16_t>(kBootParams + kBootFlag, 0xaa55);
  memory.store<uint32_t>(kBootParams + kHeader, 0x53726448);  // "HdrS"
  memory.store<uint16_t>(kBootParams + kVersion, 0x020f);
  memory.store<uint8_t>(kBootParams + kTypeOfLoader, 0xff);   // undefined boot loader
  memory.store<uint8_t>(kBootParams + kLoadFlags, kLoadedHigh);
  memory.store<uint32_t>(kBootParams + kKernelAlignment, 0x1000000);

  memory.write(kCommandLine, cmdline.c_str(), cmdline.size() + 1);
  memory.store<uint32_t>(kBootParams + kCmdLinePtr, kCommandLine);
  memory.store<uint32_t>(kBootParams + kCmdlineSize, cmdline.size());

  if (!initrd.empty()) {
    uint64_t size = 0;
    uint64_t gpa = load_initrd(memory, initrd, kernel.highest, &size);
    memory.store<uint32_t>(kBootParams + kRamdiskImage, gpa);
    memory.store<uint32_t>(kBootParams + kRamdiskSize, size);
  }

  int entries = 0;
  add_e820(memory, entries, 0, kMpTableStart, kE820Ram);
  add_e820(memory, entries, kMpTableStart, kMpTableEnd - kMpTableStart, kE820Reserved);
  add_e820(memory, entries, kHighMemory, memory.size() - kHighMemory, kE820Ram);
  memory.store<uint8_t>(kBootParams + kE820Entries, entries);

  write_mptable(memory, vcpus);
  return {kernel.entry, kBootParams};
}

}  // namespace cellvm
