"""The host side of our freestanding test guest (guest/testguests/).

The VMM loads ``testguest.elf`` straight into 64-bit mode; its parameter page
picks a mode and its results page holds what it measured. Tests, benchmarks
and the demo use these names instead of raw offsets.
"""

from __future__ import annotations

import enum
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellvm import _core

#: PVM native-mode flags the test guests opt in with: KPTI (user mode on
#: CR3|0x1000), preflip, preflip-on-SYSCALL, fast SYSRET via int $0x19.
PVM_NATIVE_FLAGS = 0x0F

RESULTS_GPA = 0x6000
PARAMS_GPA = 0x5000
#: The word MARKS and DIRTY re-read while they run (parameter `a`).
PARAM_A_GPA = PARAMS_GPA + 2 * 8
#: MODE_DIRTY writes one word into each 4 KiB page from here.
DIRTY_BASE = 0x1000000


class Mode(enum.IntEnum):
    COUNTER = 1  # a=iterations (0: forever), b=report every N
    SYSCALLS = 2  # a=iterations of null hypercalls and of user syscalls
    MMIO_LOOP = 3  # a=iterations of MMIO stores to the test device's sink
    FAULT = 4  # a=Fault
    MARKS = 5  # a=halt after mark number a (0: never; re-read at every mark), b=spins between marks
    DIRTY = 6  # mark 0, wait for a=N MiB (set by the host), dirty N MiB from DIRTY_BASE, mark N, halt
    VIRTIO_RNG = 7  # drive the virtio-rng at the first device window; a=VirtioVariant


class VirtioVariant(enum.IntEnum):
    OK = 0  # one 64-byte request
    LOOP = 1  # a descriptor chain that loops onto itself
    OUTSIDE_RAM = 2  # a buffer address beyond guest memory


class Fault(enum.IntEnum):
    TRIPLE_NATIVE = 1  # ud2 with no IDT, in native mode
    BAD_INT_NATIVE = 2  # int $0x42: a vector the host cannot emulate
    TRIPLE_EMULATED = 3  # ud2 with no IDT, before opting in


def path() -> Path:
    """Where the build installed the test guest ELF."""
    return Path(_core.__file__).parent / "guests" / "testguest.elf"


def params(mode: Mode, vcpus: int, a: int = 0, b: int = 0, *, native: bool = True) -> list[int]:
    return [int(mode), vcpus, a, b, 0, PVM_NATIVE_FLAGS if native else 0]


@dataclass(frozen=True)
class Results:
    counters: tuple[int, ...]
    cs_native: tuple[int, ...]
    done: int
    hypercall_ret: int
    hypercall_cycles: int
    syscall_cycles: int
    user_cs: int
    mmio_cycles: int
    load_idt_ret: int
    kernel_cs_in_syscall: int
    exception_vector: int
    exception_rip: int


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def read_results(machine: _core.Machine) -> Results:
    words = struct.unpack("<26Q", machine.read_memory(RESULTS_GPA, 26 * 8))
    return Results(
        counters=words[0:8],
        cs_native=words[8:16],
        done=words[16],
        hypercall_ret=_signed(words[17]),
        hypercall_cycles=words[18],
        syscall_cycles=words[19],
        user_cs=words[20],
        mmio_cycles=words[21],
        load_idt_ret=_signed(words[22]),
        kernel_cs_in_syscall=words[23],
        exception_vector=words[24],
        exception_rip=words[25],
    )


def start(mode: Mode, *, vcpus: int = 1, a: int = 0, b: int = 0, memory_mib: int = 64) -> _core.Machine:
    """A started machine running the test guest in `mode` (native on PVM)."""
    machine = _core.Machine(memory_mib=memory_mib, vcpus=vcpus)
    try:
        machine.load_test_guest(str(path()), params(mode, vcpus, a, b, native=machine.backend == "pvm"))
        machine.start()
    except BaseException:
        machine.close()
        raise
    return machine


def counters(machine: Any) -> tuple[int, ...]:
    """The COUNTER mode's per-vCPU counts (a cellvm.machine.Machine or a _core.Machine)."""
    core = getattr(machine, "core", machine)
    return read_results(core).counters[: core.vcpus]


def wait_for_progress(machine: Any, beyond: tuple[int, ...], timeout: float = 10.0) -> None:
    """Waits until every vCPU's count passed `beyond`; AssertionError if it does not in time."""
    deadline = time.monotonic() + timeout
    while not all(now > then for now, then in zip(counters(machine), beyond)):
        assert time.monotonic() < deadline, f"counters stuck at {counters(machine)}, expected beyond {beyond}"
        time.sleep(0.001)


def pvm_native_msr(vcpu: int) -> int:
    """What KVM_GET_MSRS reads from MSR 0x4b564d10 on a test-guest vCPU that
    opted into native mode: its vif page (x86_boot.h) | 0x400 | the flags."""
    return (0x20000 + 0x1000 * vcpu) | 0x400 | PVM_NATIVE_FLAGS
