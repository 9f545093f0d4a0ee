// C++ exceptions of the core. bindings.cpp maps each to its Python class in
// cellvm.errors (HypervisorError, GuestCrashed, DeadlineExceeded, ...).
#pragma once

#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>

namespace cellvm {

// /dev/kvm missing, or an ioctl failed. `what()` names the call and errno.
class HypervisorError : public std::runtime_error {
 public:
  explicit HypervisorError(const std::string& what) : std::runtime_error(what) {}
  static HypervisorError from_errno(const std::string& call);
};

// The guest stopped in a way the VMM cannot continue from.
class GuestCrashed : public std::runtime_error {
 public:
  GuestCrashed(const std::string& what, std::string reason, int vcpu,
               std::map<std::string, uint64_t> registers, std::string console)
      : std::runtime_error(what),
        reason(std::move(reason)),
        vcpu(vcpu),
        registers(std::move(registers)),
        console(std::move(console)) {}
  std::string reason;
  int vcpu;
  std::map<std::string, uint64_t> registers;
  std::string console;
};

// A wait ran past its deadline; `vcpu` is the one to blame, or -1.
class DeadlineError : public std::runtime_error {
 public:
  DeadlineError(const std::string& what, int vcpu, std::string console = {})
      : std::runtime_error(what), vcpu(vcpu), console(std::move(console)) {}
  int vcpu;
  std::string console;
};

class MachineClosedError : public std::runtime_error {
 public:
  MachineClosedError() : std::runtime_error("the machine is closed") {}
};

}  // namespace cellvm
