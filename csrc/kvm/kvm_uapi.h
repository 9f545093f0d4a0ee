// <linux/kvm.h> for C++. The uapi headers wrap flexible arrays in a struct
// holding an empty struct, which is 1 byte in C++ (0 in C): struct sizes,
// member offsets and the ioctl numbers built from them (KVM_GET_MSRS,
// KVM_SET_CPUID2, ...) would all be wrong. Declare them as plain
// zero-length arrays instead, and check the sizes the kernel expects.
#pragma once

#include <linux/stddef.h>

#undef __DECLARE_FLEX_ARRAY
#define __DECLARE_FLEX_ARRAY(TYPE, NAME) TYPE NAME[0]

#include <linux/kvm.h>

static_assert(sizeof(kvm_msrs) == 8, "kvm_msrs layout");
static_assert(sizeof(kvm_msr_list) == 4, "kvm_msr_list layout");
static_assert(sizeof(kvm_cpuid2) == 8, "kvm_cpuid2 layout");
static_assert(sizeof(kvm_irq_routing) == 8, "kvm_irq_routing layout");
