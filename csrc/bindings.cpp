// The only file that knows nanobind: cellvm._core, the Python face of the VMM.
// Every call that can block (KVM ioctls, waits, joins) releases the GIL.
#include <nanobind/nanobind.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/unique_ptr.h>
#include <nanobind/stl/vector.h>

#include <chrono>

#include "common/errors.h"
#include "snapshot/memory_file.h"
#include "snapshot/state_file.h"
#include "vm/machine.h"
#include "vm/vm_pool.h"

namespace nb = nanobind;
using namespace nb::literals;
using namespace cellvm;

namespace {

using ReleaseGil = nb::call_guard<nb::gil_scoped_release>;

std::chrono::nanoseconds seconds(double s) {
  if (!(s >= 0)) throw std::invalid_argument("timeouts must be >= 0 seconds");
  return std::chrono::nanoseconds(static_cast<int64_t>(s * 1e9));
}

// Sets cellvm.errors.<name>(message, **kwargs) as the pending Python error.
void raise_python(const char* name, const char* message, nb::kwargs kwargs = {}) {
  nb::object cls = nb::module_::import_("cellvm.errors").attr(name);
  nb::object error = cls(message, **kwargs);
  PyErr_SetObject(cls.ptr(), error.ptr());
}

void translate(const std::exception_ptr& p, void*) {
  try {
    std::rethrow_exception(p);
  } catch (const GuestCrashed& e) {
    nb::kwargs kw;
    kw["reason"] = e.reason;
    kw["vcpu"] = e.vcpu;
    kw["registers"] = e.registers;
    kw["console"] = e.console;
    raise_python("GuestCrashed", e.what(), kw);
  } catch (const DeadlineError& e) {
    nb::kwargs kw;
    kw["vcpu"] = e.vcpu >= 0 ? nb::cast(e.vcpu) : nb::none();
    kw["console"] = e.console;
    raise_python("DeadlineExceeded", e.what(), kw);
  } catch (const SnapshotCorruptError& e) {
    raise_python("SnapshotCorrupt", e.what());
  } catch (const SnapshotIncompatibleError& e) {
    raise_python("SnapshotIncompatible", e.what());
  } catch (const MachineClosedError& e) {
    raise_python("MachineClosed", e.what());
  } catch (const CoordinatorShutDown& e) {
    // Only after the machine stopped (guest exit, fault or close()).
    raise_python("MachineClosed", (std::string("the machine has stopped: ") + e.what()).c_str());
  } catch (const HypervisorError& e) {
    raise_python("HypervisorError", e.what());
  }
}

DeviceSpec device_spec(const nb::dict& d) {
  std::string kind = nb::cast<std::string>(d["kind"]);
  DeviceSpec spec{};
  if (kind == "console") spec.kind = DeviceSpec::Kind::Console;
  else if (kind == "rng") spec.kind = DeviceSpec::Kind::Rng;
  else if (kind == "block") spec.kind = DeviceSpec::Kind::Block;
  else throw std::invalid_argument("unknown device kind " + kind);
  if (d.contains("path")) spec.path = nb::cast<std::string>(d["path"]);
  if (d.contains("read_only")) spec.read_only = nb::cast<bool>(d["read_only"]);
  return spec;
}

nb::dict state_summary(const VcpuState& s) {
  nb::dict d;
  const kvm_regs& r = s.regs;
  d["rax"] = r.rax; d["rbx"] = r.rbx; d["rcx"] = r.rcx; d["rdx"] = r.rdx;
  d["rsi"] = r.rsi; d["rdi"] = r.rdi; d["rsp"] = r.rsp; d["rbp"] = r.rbp;
  d["r8"] = r.r8; d["r9"] = r.r9; d["r10"] = r.r10; d["r11"] = r.r11;
  d["r12"] = r.r12; d["r13"] = r.r13; d["r14"] = r.r14; d["r15"] = r.r15;
  d["rip"] = r.rip; d["rflags"] = r.rflags;
  d["cs"] = s.sregs.cs.selector;
  d["cr3"] = s.sregs.cr3;
  d["mp_state"] = s.mp_state.mp_state;
  nb::dict msrs;
  for (const kvm_msr_entry& m : s.msrs) {
    msrs[nb::int_(m.index)] = m.data;
    if (m.index == kMsrPvmNative) d["pvm_native"] = m.data;
  }
  d["msrs"] = msrs;
  d["msr_count"] = s.msrs.size();
  d["xsave_bytes"] = s.xsave.size();
  return d;
}

}  // namespace

NB_MODULE(_core, m) {
  m.doc() = "cellvm's VMM: KVM (and this host's PVM) microVMs driven from Python.";
  nb::register_exception_translator(translate);

  m.def(
      "hypervisor_info",
      [] {
        const Kvm& kvm = Kvm::instance();
        nb::dict d;
        d["backend"] = backend_name(kvm.backend());
        d["cpuid_entries"] = kvm.supported_cpuid().size();
        d["msrs"] = kvm.msr_index_list();
        return d;
      },
      "Facts about /dev/kvm: backend ('pvm' or 'kvm'), CPUID entries, the MSR index list.");

  m.def(
      "flatten_memory",
      [](const std::vector<std::string>& layers, uint64_t size, const std::string& path) {
        return flatten_memory_layers(layers, size, path).bytes_written;
      },
      "layers"_a, "size"_a, "path"_a, ReleaseGil(),
      "Write memory images (full, then diffs, oldest first) as one full image; returns bytes written.");

  auto pool_key = [](uint64_t memory_mib, int vcpus, const std::vector<std::string>& layers, const std::string& state) {
    return VmPool::Key{memory_mib << 20, vcpus, layers, state};
  };
  m.def(
      "vm_pool_set_target",
      [pool_key](uint64_t memory_mib, int vcpus, const std::vector<std::string>& layers, int count,
                 const std::string& state, const std::string& working_set) {
        VmPool::instance().set_target(pool_key(memory_mib, vcpus, layers, state), count, working_set);
      },
      "memory_mib"_a, "vcpus"_a, "layers"_a, "count"_a, "state"_a = "", "working_set"_a = "", ReleaseGil(),
      "Keep `count` machines of this shape prepared for restores (layers: premapped memory images, or [] "
      "for any snapshot of the shape; state: also that state.bin applied; working_set: a file from "
      "Machine.write_working_set whose pages are copied ahead); 0 drops them.");
  m.def(
      "vm_pool_wait",
      [pool_key](uint64_t memory_mib, int vcpus, const std::vector<std::string>& layers, int count, double timeout,
                 const std::string& state) {
        return VmPool::instance().wait_ready(pool_key(memory_mib, vcpus, layers, state), count, seconds(timeout));
      },
      "memory_mib"_a, "vcpus"_a, "layers"_a, "count"_a, "timeout"_a, "state"_a = "", ReleaseGil(),
      "Wait until `count` prepared machines are ready (or the build failed); returns how many are.");
  m.def(
      "vm_pool_status",
      [] {
        nb::list out;
        for (const VmPool::Status& s : VmPool::instance().status()) {
          nb::dict d;
          d["memory_mib"] = s.key.memory_bytes >> 20;
          d["vcpus"] = s.key.vcpus;
          d["layers"] = s.key.layers;
          d["state"] = s.key.state;
          d["target"] = s.target;
          d["ready"] = s.ready;
          d["error"] = s.error;
          out.append(d);
        }
        return out;
      },
      "Every pool key with its target, ready count and last build error.");
  m.def("vm_pool_clear", [] { VmPool::instance().clear(); }, ReleaseGil(),
        "Drop every prepared machine and stop the pool's worker.");

  nb::class_<Machine>(m, "Machine", "A microVM: guest memory, vCPU threads, devices.")
      .def(
          "__init__",
          [](Machine* self, int memory_mib, int vcpus) {
            new (self) Machine(MachineConfig{static_cast<uint64_t>(memory_mib) << 20, vcpus});
          },
          "memory_mib"_a = 64, "vcpus"_a = 1, ReleaseGil())
      .def_prop_ro("backend", [](const Machine& self) { return backend_name(self.backend()); })
      .def_prop_ro("vcpus", [](const Machine& self) { return self.config().vcpus; })
      .def_prop_ro("memory_size", [](const Machine& self) { return self.config().memory_bytes; })
      .def_prop_ro("tsc_khz", &Machine::tsc_khz)
      .def("load_test_guest", &Machine::load_test_guest, "path"_a, "params"_a, ReleaseGil(),
           "Load a test guest ELF; every vCPU starts at its entry with the given parameter words.")
      .def("load_linux", &Machine::load_linux, "vmlinux"_a, "initrd"_a = "", "cmdline"_a = "", ReleaseGil(),
           "Load an uncompressed vmlinux (+ initrd) for the 64-bit boot protocol.")
      .def_prop_ro("memory_restored", &Machine::memory_restored,
                   "True if guest RAM is a MAP_PRIVATE mapping of snapshot images.")
      .def(
          "save_snapshot",
          [](Machine& self, const std::string& dir, double timeout, bool resume) {
            SnapshotStats stats = self.snapshot(dir, seconds(timeout), resume);
            std::map<std::string, double> out{{"diff", stats.diff ? 1.0 : 0.0},
                                              {"pages_written", double(stats.pages_written)},
                                              {"bytes_written", double(stats.bytes_written)},
                                              {"pause_seconds", stats.pause_seconds}};
            return out;
          },
          "dir"_a, "timeout"_a = 1.0, "resume"_a = true, ReleaseGil(),
          "Pause, write state.bin and memory.bin into `dir`, resume unless told not to.")
      .def_static(
          "restore_snapshot",
          [](const std::string& state, const std::vector<std::string>& layers, const std::vector<nb::dict>& devices,
             double timeout, int inject_apply_failure, const std::string& working_set) {
            std::vector<DeviceSpec> specs;
            {
              nb::gil_scoped_acquire gil;
              for (const nb::dict& d : devices) specs.push_back(device_spec(d));
            }
            return Machine::restore(state, layers, specs, seconds(timeout), inject_apply_failure, working_set);
          },
          "state"_a, "memory_layers"_a, "devices"_a = std::vector<nb::dict>{}, "timeout"_a = 1.0,
          "inject_apply_failure"_a = -1, "working_set"_a = "", ReleaseGil(),
          "A running machine continued from state.bin and memory images (full, then diffs). A working set "
          "(Machine.write_working_set) is copied ahead when the machine is not a prepared one.")
      .def(
          "add_device", [](Machine& self, const nb::dict& spec) { return self.add_device(device_spec(spec)); },
          "spec"_a,
          "Attach a virtio device before load_linux: {'kind': 'console'|'block'|'rng', 'path': ..., "
          "'read_only': True}. Returns its index.")
      .def("console_socket", &Machine::console_socket, "index"_a,
           "A new fd (yours to close) for the host end of console device `index`.")
      .def_prop_ro("device_cmdline", &Machine::device_cmdline)
      .def("restore_phases", &Machine::restore_phases,
           "Where the last restore's time went: [(phase, its end in seconds after the restore began)], "
           "then first_exit.<vCPU>. Empty if this machine was not restored.")
      .def("resident_pages", &Machine::resident_pages, "private_only"_a = false, ReleaseGil(),
           "Guest pages resident in this process's mapping of guest RAM, as runs [(first page, count)]; "
           "private_only: only this machine's own copies (pages written since the restore).")
      .def("write_working_set", &Machine::write_working_set, "path"_a, ReleaseGil(),
           "Write resident_pages(private_only=True) to `path` as a working set for prepared machines "
           "(vm_pool_set_target).")
      .def_prop_ro("restore_started", &Machine::restore_started,
                   "When the restore began (time.monotonic() seconds); 0 if not restored.")
      .def("start", &Machine::start, ReleaseGil(), "Start every vCPU thread.")
      .def(
          "wait", [](Machine& self, double timeout) { return self.wait(seconds(timeout)); }, "timeout"_a,
          ReleaseGil(),
          "The guest's exit code once it stopped the machine, or None if `timeout` seconds passed. "
          "Raises GuestCrashed if a vCPU faulted.")
      .def_prop_ro("stopped", &Machine::stopped)
      .def(
          "pause",
          [](Machine& self, double timeout) {
            std::vector<std::optional<VcpuState>> states;
            {
              nb::gil_scoped_release release;
              states = self.pause(seconds(timeout));
            }
            nb::list out;
            for (const auto& s : states) out.append(s ? nb::object(state_summary(*s)) : nb::none());
            return out;
          },
          "timeout"_a = 1.0,
          "Stop every vCPU at the pause barrier; returns each vCPU's registers (None: not running). "
          "Raises DeadlineExceeded naming a vCPU that did not arrive.")
      .def("resume", &Machine::resume, ReleaseGil(), "Release every paused vCPU together.")
      .def("close", &Machine::close, ReleaseGil(), "Stop the vCPUs, join their threads, free the VM.")
      .def("__enter__", [](Machine& self) -> Machine& { return self; }, nb::rv_policy::reference)
      .def(
          "__exit__", [](Machine& self, nb::handle, nb::handle, nb::handle) { self.close(); },
          nb::arg().none(), nb::arg().none(), nb::arg().none(), ReleaseGil())
      .def("console", [](const Machine& self) { return nb::bytes(self.console().data(), self.console().size()); },
           "The guest console output kept so far (the last MiB).")
      .def(
          "reports",
          [](const Machine& self) {
            std::vector<std::pair<uint64_t, uint64_t>> out;
            for (const auto& r : self.reports()) out.emplace_back(r.last, r.count);
            out.resize(self.config().vcpus);
            return out;
          },
          "(last value, count) of each vCPU's test-device reports.")
      .def(
          "marks",
          [](const Machine& self) {
            std::vector<std::tuple<uint64_t, int, double>> out;
            for (const auto& mark : self.marks())
              out.emplace_back(mark.value, mark.vcpu,
                               std::chrono::duration<double>(mark.when.time_since_epoch()).count());
            return out;
          },
          "(value, vCPU, time.monotonic()-comparable seconds) of each test-device mark.")
      .def(
          "read_memory",
          [](Machine& self, uint64_t gpa, uint64_t size) {
            const uint8_t* p = self.memory().at(gpa, size);
            return nb::bytes(reinterpret_cast<const char*>(p), size);
          },
          "gpa"_a, "size"_a)
      .def(
          "write_memory",
          [](Machine& self, uint64_t gpa, nb::bytes data) { self.memory().write(gpa, data.c_str(), data.size()); },
          "gpa"_a, "data"_a)
      .def(
          "vcpu_stats",
          [](const Machine& self, int vcpu) {
            std::map<std::string, uint64_t> out;
            for (auto& [name, value] : self.vcpu_stats(vcpu)) out[name] = value;
            return out;
          },
          "vcpu"_a, ReleaseGil(), "KVM's binary stats of one vCPU (exits, insn_emulation, ...).");
}
