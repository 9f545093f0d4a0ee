#include "vm/elf.h"

#include <elf.h>
#include <fcntl.h>
#include <sys/stat.h>

#include <cstring>
#include <stdexcept>
#include <vector>

#include "common/errors.h"
#include "common/fd.h"
#include "vm/memory.h"

namespace cellvm {

LoadedElf load_elf(GuestMemory& memory, const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) throw std::invalid_argument("cannot open guest image " + path + ": " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd.get(), &st) < 0) throw HypervisorError::from_errno("fstat(" + path + ")");
  size_t size = st.st_size;
  void* addr = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd.get(), 0);
  if (addr == MAP_FAILED) throw HypervisorError::from_errno("mmap(" + path + ")");
  Mapping file(addr, size);
  const auto* bytes = file.as<const uint8_t>();

  auto bad = [&](const std::string& why) { return std::invalid_argument(path + ": " + why); };
  if (size < sizeof(Elf64_Ehdr)) throw bad("too small for an ELF header");
  const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(bytes);
  if (std::memcmp(eh->e_ident, ELFMAG, SELFMAG) != 0) throw bad("not an ELF file");
  if (eh->e_ident[EI_CLASS] != ELFCLASS64 || eh->e_machine != EM_X86_64) throw bad("not an x86-64 ELF");
  if (eh->e_phentsize != sizeof(Elf64_Phdr) || eh->e_phoff > size ||
      eh->e_phnum > (size - eh->e_phoff) / sizeof(Elf64_Phdr))
    throw bad("program headers out of the file");

  LoadedElf out{eh->e_entry, UINT64_MAX, 0};
  const auto* ph = reinterpret_cast<const Elf64_Phdr*>(bytes + eh->e_phoff);
  for (int i = 0; i < eh->e_phnum; ++i) {
    if (ph[i].p_type != PT_LOAD || ph[i].p_memsz == 0) continue;
    if (ph[i].p_filesz > ph[i].p_memsz || ph[i].p_offset > size || ph[i].p_filesz > size - ph[i].p_offset)
      throw bad("segment " + std::to_string(i) + " out of the file");
    uint8_t* dest;
    try {
      dest = memory.at(ph[i].p_paddr, ph[i].p_memsz);
    } catch (const std::out_of_range&) {
      throw bad("segment " + std::to_string(i) + " does not fit in guest memory");
    }
    std::memcpy(dest, bytes + ph[i].p_offset, ph[i].p_filesz);
    std::memset(dest + ph[i].p_filesz, 0, ph[i].p_memsz - ph[i].p_filesz);
    out.lowest = std::min<uint64_t>(out.lowest, ph[i].p_paddr);
    out.highest = std::max<uint64_t>(out.highest, ph[i].p_paddr + ph[i].p_memsz);
  }
  if (out.highest == 0) throw bad("no loadable segment");
  return out;
}

}  // namespace cellvm
