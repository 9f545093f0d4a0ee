#include "kvm/kvm.h"

#include <fcntl.h>
#include <sys/ioctl.h>

#include <cerrno>
#include <cstring>
#include <mutex>

#include "common/errors.h"

namespace cellvm {

HypervisorError HypervisorError::from_errno(const std::string& call) {
  int err = errno;
  return HypervisorError(call + " failed: " + std::strerror(err) + " (errno " + std::to_string(err) + ")");
}

namespace {

// ioctl that retries on EINTR (a kick signal may land in any of them).
template <class Arg>
int xioctl(int fd, unsigned long request, Arg arg, const char* name) {
  int ret;
  do {
    ret = ::ioctl(fd, request, arg);
  } while (ret < 0 && errno == EINTR);
  if (ret < 0) throw HypervisorError::from_errno(name);
  return ret;
}

}  // namespace

const char* backend_name(Backend b) { return b == Backend::Pvm ? "pvm" : "kvm"; }

const Kvm& Kvm::instance() {
  // A failed open is not cached: the next caller gets the error again.
  static std::mutex mutex;
  static std::unique_ptr<Kvm> kvm;
  std::lock_guard lock(mutex);
  if (!kvm) kvm.reset(new Kvm());  // private constructor: make_unique cannot reach it
  return *kvm;
}

Kvm::Kvm() {
  fd_.reset(::open("/dev/kvm", O_RDWR | O_CLOEXEC));
  if (!fd_) throw HypervisorError::from_errno("open(/dev/kvm)");
  int version = xioctl(fd_.get(), KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION");
  if (version != KVM_API_VERSION)
    throw HypervisorError("unsupported KVM API version " + std::to_string(version));
  for (long cap : {KVM_CAP_IMMEDIATE_EXIT, KVM_CAP_IRQCHIP, KVM_CAP_USER_MEMORY}) {
    if (check_extension(cap) <= 0)
      throw HypervisorError("KVM lacks required capability " + std::to_string(cap));
  }
  vcpu_mmap_size_ = xioctl(fd_.get(), KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE");

  for (size_t n = 128;; n *= 2) {
    std::vector<uint8_t> buf(sizeof(kvm_cpuid2) + n * sizeof(kvm_cpuid_entry2));
    auto* cpuid = reinterpret_cast<kvm_cpuid2*>(buf.data());
    cpuid->nent = n;
    if (::ioctl(fd_.get(), KVM_GET_SUPPORTED_CPUID, cpuid) == 0) {
      cpuid_.assign(cpuid->entries, cpuid->entries + cpuid->nent);
      break;
    }
    if (errno != E2BIG || n > 4096) throw HypervisorError::from_errno("KVM_GET_SUPPORTED_CPUID");
  }

  kvm_msr_list probe{};
  if (::ioctl(fd_.get(), KVM_GET_MSR_INDEX_LIST, &probe) < 0 && errno != E2BIG)
    throw HypervisorError::from_errno("KVM_GET_MSR_INDEX_LIST");
  std::vector<uint8_t> buf(sizeof(kvm_msr_list) + probe.nmsrs * sizeof(uint32_t));
  auto* list = reinterpret_cast<kvm_msr_list*>(buf.data());
  list->nmsrs = probe.nmsrs;
  xioctl(fd_.get(), KVM_GET_MSR_INDEX_LIST, list, "KVM_GET_MSR_INDEX_LIST");
  msr_list_.assign(list->indices, list->indices + list->nmsrs);
}

Backend Kvm::backend(int vcpu_fd) const {
  std::call_once(backend_once_, [&] {
    UniqueFd scratch_vm, scratch_vcpu;
    if (vcpu_fd < 0) {
      scratch_vm.reset(xioctl(fd_.get(), KVM_CREATE_VM, 0, "KVM_CREATE_VM"));
      scratch_vcpu.reset(xioctl(scratch_vm.get(), KVM_CREATE_VCPU, 0, "KVM_CREATE_VCPU"));
      vcpu_fd = scratch_vcpu.get();
    }
    alignas(kvm_msrs) uint8_t probe_buf[sizeof(kvm_msrs) + sizeof(kvm_msr_entry)] = {};
    auto* probe = reinterpret_cast<kvm_msrs*>(probe_buf);
    probe->nmsrs = 1;
    probe->entries[0].index = kMsrPvmSignature;
    if (::ioctl(vcpu_fd, KVM_GET_MSRS, probe) == 1 && probe->entries[0].data == kPvmSignature) backend_ = Backend::Pvm;
  });
  return backend_;
}

int Kvm::check_extension(long cap) const { return ::ioctl(fd_.get(), KVM_CHECK_EXTENSION, cap); }

KvmVm::KvmVm() {
  const Kvm& kvm = Kvm::instance();
  fd_.reset(xioctl(kvm.fd(), KVM_CREATE_VM, 0, "KVM_CREATE_VM"));
}

void KvmVm::set_memory_region(uint32_t slot, uint64_t gpa, uint64_t size, void* host, uint32_t flags) {
  kvm_userspace_memory_region region{};
  region.slot = slot;
  region.flags = flags;
  region.guest_phys_addr = gpa;
  region.memory_size = size;
  region.userspace_addr = reinterpret_cast<uint64_t>(host);
  xioctl(fd_.get(), KVM_SET_USER_MEMORY_REGION, &region, "KVM_SET_USER_MEMORY_REGION");
}

void KvmVm::create_irqchip() { xioctl(fd_.get(), KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP"); }

void KvmVm::create_pit() {
  kvm_pit_config config{};
  config.flags = KVM_PIT_SPEAKER_DUMMY;
  xioctl(fd_.get(), KVM_CREATE_PIT2, &config, "KVM_CREATE_PIT2");
}

void KvmVm::set_tss_addr(uint64_t gpa) { xioctl(fd_.get(), KVM_SET_TSS_ADDR, gpa, "KVM_SET_TSS_ADDR"); }

void KvmVm::set_identity_map_addr(uint64_t gpa) {
  xioctl(fd_.get(), KVM_SET_IDENTITY_MAP_ADDR, &gpa, "KVM_SET_IDENTITY_MAP_ADDR");
}

void KvmVm::irq_line(uint32_t irq, bool level) {
  kvm_irq_level line{};
  line.irq = irq;
  line.level = level ? 1 : 0;
  xioctl(fd_.get(), KVM_IRQ_LINE, &line, "KVM_IRQ_LINE");
}

kvm_irqchip KvmVm::get_irqchip(uint32_t chip_id) const {
  kvm_irqchip chip{};
  chip.chip_id = chip_id;
  xioctl(fd_.get(), KVM_GET_IRQCHIP, &chip, "KVM_GET_IRQCHIP");
  return chip;
}

void KvmVm::set_irqchip(const kvm_irqchip& chip) {
  kvm_irqchip copy = chip;
  xioctl(fd_.get(), KVM_SET_IRQCHIP, &copy, "KVM_SET_IRQCHIP");
}

kvm_clock_data KvmVm::get_clock() const {
  kvm_clock_data clock{};
  xioctl(fd_.get(), KVM_GET_CLOCK, &clock, "KVM_GET_CLOCK");
  return clock;
}

void KvmVm::set_clock(const kvm_clock_data& clock) {
  kvm_clock_data copy = clock;
  copy.flags = 0;
  xioctl(fd_.get(), KVM_SET_CLOCK, &copy, "KVM_SET_CLOCK");
}

uint64_t KvmVm::tsc_khz() const {
  int khz = ::ioctl(fd_.get(), KVM_GET_TSC_KHZ, 0);
  return khz > 0 ? static_cast<uint64_t>(khz) : 0;
}

std::unique_ptr<KvmVcpu> KvmVm::create_vcpu(int index) {
  UniqueFd fd(xioctl(fd_.get(), KVM_CREATE_VCPU, index, "KVM_CREATE_VCPU"));
  return std::make_unique<KvmVcpu>(index, std::move(fd));
}

// ---------------------------------------------------------------- vCPU

KvmVcpu::KvmVcpu(int index, UniqueFd fd) : index_(index), fd_(std::move(fd)) {
  size_t size = Kvm::instance().vcpu_mmap_size();
  void* addr = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd_.get(), 0);
  if (addr == MAP_FAILED) throw HypervisorError::from_errno("mmap(kvm_run)");
  run_ = Mapping(addr, size);
  // Now, not lazily: KVM_GET_STATS_FD takes the vCPU mutex, which a vCPU
  // blocked in KVM_RUN (halted) holds, so a later call could wait forever.
  stats_ = std::make_unique<VcpuStats>(fd_.get());
}

bool KvmVcpu::run() {
  if (::ioctl(fd_.get(), KVM_RUN, 0) == 0) return true;
  if (errno == EINTR || errno == EAGAIN) return false;
  throw HypervisorError::from_errno("KVM_RUN");
}

#define CELLVM_GET(type, ioctl_nr)                         \
  type value{};                                            \
  xioctl(fd_.get(), ioctl_nr, &value, #ioctl_nr);          \
  return value

kvm_regs KvmVcpu::get_regs() const { CELLVM_GET(kvm_regs, KVM_GET_REGS); }
kvm_sregs KvmVcpu::get_sregs() const { CELLVM_GET(kvm_sregs, KVM_GET_SREGS); }
kvm_xcrs KvmVcpu::get_xcrs() const { CELLVM_GET(kvm_xcrs, KVM_GET_XCRS); }
kvm_lapic_state KvmVcpu::get_lapic() const { CELLVM_GET(kvm_lapic_state, KVM_GET_LAPIC); }
kvm_vcpu_events KvmVcpu::get_events() const { CELLVM_GET(kvm_vcpu_events, KVM_GET_VCPU_EVENTS); }
kvm_mp_state KvmVcpu::get_mp_state() const { CELLVM_GET(kvm_mp_state, KVM_GET_MP_STATE); }
kvm_debugregs KvmVcpu::get_debugregs() const { CELLVM_GET(kvm_debugregs, KVM_GET_DEBUGREGS); }
#undef CELLVM_GET

void KvmVcpu::set_regs(const kvm_regs& v) { xioctl(fd_.get(), KVM_SET_REGS, &v, "KVM_SET_REGS"); }
void KvmVcpu::set_sregs(const kvm_sregs& v) { xioctl(fd_.get(), KVM_SET_SREGS, &v, "KVM_SET_SREGS"); }
void KvmVcpu::set_xcrs(const kvm_xcrs& v) { xioctl(fd_.get(), KVM_SET_XCRS, &v, "KVM_SET_XCRS"); }
void KvmVcpu::set_lapic(const kvm_lapic_state& v) { xioctl(fd_.get(), KVM_SET_LAPIC, &v, "KVM_SET_LAPIC"); }
void KvmVcpu::set_events(const kvm_vcpu_events& v) {
  xioctl(fd_.get(), KVM_SET_VCPU_EVENTS, &v, "KVM_SET_VCPU_EVENTS");
}
void KvmVcpu::set_debugregs(const kvm_debugregs& v) {
  xioctl(fd_.get(), KVM_SET_DEBUGREGS, &v, "KVM_SET_DEBUGREGS");
}
void KvmVcpu::set_mp_state(uint32_t state) {
  kvm_mp_state mp{state};
  xioctl(fd_.get(), KVM_SET_MP_STATE, &mp, "KVM_SET_MP_STATE");
}

void KvmVcpu::set_cpuid(const std::vector<kvm_cpuid_entry2>& entries) {
  std::vector<uint8_t> buf(sizeof(kvm_cpuid2) + entries.size() * sizeof(kvm_cpuid_entry2));
  auto* cpuid = reinterpret_cast<kvm_cpuid2*>(buf.data());
  cpuid->nent = entries.size();
  std::memcpy(cpuid->entries, entries.data(), entries.size() * sizeof(kvm_cpuid_entry2));
  xioctl(fd_.get(), KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2");
}

std::vector<kvm_msr_entry> KvmVcpu::get_msrs(const std::vector<uint32_t>& indices) const {
  // KVM_GET_MSRS stops at the first MSR it refuses and returns how many it
  // read; skip the refused one and go on so one odd MSR loses nothing else.
  std::vector<kvm_msr_entry> result;
  size_t next = 0;
  while (next < indices.size()) {
    size_t n = indices.size() - next;
    std::vector<uint8_t> buf(sizeof(kvm_msrs) + n * sizeof(kvm_msr_entry));
    auto* msrs = reinterpret_cast<kvm_msrs*>(buf.data());
    msrs->nmsrs = n;
    for (size_t i = 0; i < n; ++i) msrs->entries[i].index = indices[next + i];
    int got = xioctl(fd_.get(), KVM_GET_MSRS, msrs, "KVM_GET_MSRS");
    result.insert(result.end(), msrs->entries, msrs->entries + got);
    next += got + 1;  // skip the refused one
  }
  return result;
}

void KvmVcpu::set_msrs(const std::vector<kvm_msr_entry>& entries) {
  std::vector<uint8_t> buf(sizeof(kvm_msrs) + entries.size() * sizeof(kvm_msr_entry));
  auto* msrs = reinterpret_cast<kvm_msrs*>(buf.data());
  msrs->nmsrs = entries.size();
  std::memcpy(msrs->entries, entries.data(), entries.size() * sizeof(kvm_msr_entry));
  int set = xioctl(fd_.get(), KVM_SET_MSRS, msrs, "KVM_SET_MSRS");
  if (static_cast<size_t>(set) != entries.size()) {
    char hex[32];
    std::snprintf(hex, sizeof hex, "0x%x", entries[set].index);
    throw HypervisorError(std::string("KVM_SET_MSRS refused MSR ") + hex);
  }
}

std::vector<uint8_t> KvmVcpu::get_xsave() const {
  int size = Kvm::instance().check_extension(KVM_CAP_XSAVE2);
  std::vector<uint8_t> buf(std::max<int>(size, sizeof(kvm_xsave)));
  xioctl(fd_.get(), size > 0 ? KVM_GET_XSAVE2 : KVM_GET_XSAVE, buf.data(), "KVM_GET_XSAVE2");
  return buf;
}

void KvmVcpu::set_xsave(const std::vector<uint8_t>& xsave) {
  xioctl(fd_.get(), KVM_SET_XSAVE, xsave.data(), "KVM_SET_XSAVE");
}

const VcpuStats& KvmVcpu::stats() const {
  if (!stats_) stats_ = std::make_unique<VcpuStats>(fd_.get());
  return *stats_;
}

// ---------------------------------------------------------------- stats

VcpuStats::VcpuStats(int vcpu_fd) {
  fd_.reset(xioctl(vcpu_fd, KVM_GET_STATS_FD, 0, "KVM_GET_STATS_FD"));
  kvm_stats_header header{};
  if (::pread(fd_.get(), &header, sizeof header, 0) != sizeof header)
    throw HypervisorError::from_errno("read(kvm stats header)");
  data_offset_ = header.data_offset;
  size_t desc_size = sizeof(kvm_stats_desc) + header.name_size;
  std::vector<uint8_t> buf(desc_size * header.num_desc);
  if (::pread(fd_.get(), buf.data(), buf.size(), header.desc_offset) != static_cast<ssize_t>(buf.size()))
    throw HypervisorError::from_errno("read(kvm stats descriptors)");
  for (uint32_t i = 0; i < header.num_desc; ++i) {
    auto* d = reinterpret_cast<kvm_stats_desc*>(buf.data() + i * desc_size);
    descs_.push_back({std::string(d->name, strnlen(d->name, header.name_size)), d->offset, d->size});
  }
}

uint64_t VcpuStats::read(const std::string& name) const {
  for (const Desc& d : descs_) {
    if (d.name != name) continue;
    uint64_t value = 0;
    if (::pread(fd_.get(), &value, sizeof value, data_offset_ + d.offset) != sizeof value)
      throw HypervisorError::from_errno("read(kvm stat " + name + ")");
    return value;
  }
  return 0;
}

std::vector<std::pair<std::string, uint64_t>> VcpuStats::read_all() const {
  std::vector<std::pair<std::string, uint64_t>> out;
  for (const Desc& d : descs_) {
    if (d.size != 1) continue;  // histograms are not counters
    uint64_t value = 0;
    if (::pread(fd_.get(), &value, sizeof value, data_offset_ + d.offset) == sizeof value)
      out.emplace_back(d.name, value);
  }
  return out;
}

}  // namespace cellvm
