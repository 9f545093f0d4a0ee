"""The VMM core on the real /dev/kvm, driven through cellvm._core with our
own test guests (guest/testguests/). Nothing is mocked here."""

from __future__ import annotations

import os
import time

import pytest

from cellvm import _core, testguest
from cellvm.errors import GuestCrashed, MachineClosed
from cellvm.testguest import Fault, Mode, read_results

pytestmark = pytest.mark.usefixtures("kvm")

NATIVE_CS = 0x33  # PVM runs the guest kernel at hardware CPL3 with the user CS
EMULATED_CS = 0x10


def is_pvm() -> bool:
    return _core.hypervisor_info()["backend"] == "pvm"


@pytest.mark.parametrize("vcpus", [1, 2, 8])
def test_counter_runs_on_every_vcpu(vcpus: int) -> None:
    iterations, every = 3_000_000, 1_000_000
    with testguest.start(Mode.COUNTER, vcpus=vcpus, a=iterations, b=every) as m:
        assert m.wait(timeout=30) == 0
        results = read_results(m)
        assert results.counters[:vcpus] == (iterations,) * vcpus
        assert m.reports() == [(iterations, iterations // every)] * vcpus
        assert results.done == vcpus
        if is_pvm():
            assert results.cs_native[:vcpus] == (NATIVE_CS,) * vcpus
        assert m.console().endswith(b"testguest: ok\n")


def counters(m: _core.Machine) -> tuple[int, ...]:
    return read_results(m).counters[: m.vcpus]


def wait_until_counting(m: _core.Machine) -> None:
    deadline = time.monotonic() + 10
    while not all(counters(m)):
        assert time.monotonic() < deadline, "the guest never started counting"
        time.sleep(0.001)


def test_pause_returns_every_vcpu_and_resume_continues() -> None:
    with testguest.start(Mode.COUNTER, vcpus=2, a=0) as m:  # counts forever
        wait_until_counting(m)
        states = m.pause(timeout=2.0)
        assert len(states) == 2 and all(s is not None for s in states)
        text_start, text_end = 0x100000, 0x110000
        for s in states:
            assert text_start <= s["rip"] < text_end
            # The host keeps a virtual CPL0 (CS 0x10) even while the guest runs
            # natively at hardware CPL3; the native switch is the PVM MSR.
            assert s["cs"] == EMULATED_CS
            if is_pvm():
                assert s["pvm_native"] == testguest.pvm_native_msr(states.index(s))
        paused = counters(m)
        time.sleep(0.05)
        assert counters(m) == paused, "a paused vCPU kept counting"
        m.resume()
        deadline = time.monotonic() + 10
        while not all(now > then for now, then in zip(counters(m), paused)):
            assert time.monotonic() < deadline, "counting did not continue after resume"
            time.sleep(0.001)
        # A second pause returns fresh state, not the first one's.
        again = m.pause(timeout=2.0)
        assert [s["rcx"] != t["rcx"] or s["rip"] != t["rip"] or s["rax"] != t["rax"] for s, t in zip(again, states)]
        m.resume()


def test_native_mode_stays_native() -> None:
    """After the opt-in, guest code runs natively: the vCPU's insn_emulation
    counter (KVM binary stats) stays flat while the guest computes. It is not
    perfectly still: the host emulates the odd instruction after it preempts
    the vCPU (about one per three host-side exits, ~100/s on a busy host),
    so "flat" means no growth with the work done: emulated, every loop
    iteration would count several."""
    if not is_pvm():
        pytest.skip("native mode is this host's PVM; hardware KVM has no emulation counter to watch")
    with testguest.start(Mode.COUNTER, vcpus=2, a=0) as m:
        wait_until_counting(m)
        before = [m.vcpu_stats(i)["insn_emulation"] for i in range(2)]
        counted = counters(m)
        time.sleep(0.3)
        after = [m.vcpu_stats(i)["insn_emulation"] for i in range(2)]
        iterations = [now - then for now, then in zip(counters(m), counted)]
        assert all(n > 1_000_000 for n in iterations), iterations
        for emulated, n in zip((a - b for a, b in zip(after, before)), iterations):
            assert emulated < n / 10_000, f"{emulated} emulated instructions in {n} iterations"


def test_hypercalls_and_syscall_round_trips_run_natively() -> None:
    iterations = 20_000
    with testguest.start(Mode.SYSCALLS, a=iterations) as m:
        assert m.wait(timeout=30) == 0
        r = read_results(m)
        stats = m.vcpu_stats(0)
    if is_pvm():
        assert r.cs_native[0] == NATIVE_CS
        assert r.load_idt_ret == 0
        assert r.hypercall_ret == -38  # an unknown hypercall number: -ENOSYS
        assert r.user_cs == NATIVE_CS
        assert r.kernel_cs_in_syscall == NATIVE_CS
        assert r.hypercall_cycles > 0 and r.syscall_cycles > 0
        # 2 x 20,000 round trips, yet only the few instructions before the
        # opt-in and the test device stores were emulated.
        assert stats["insn_emulation"] < 100
        # Syscall round trips take no VM exit at all; hypercalls one each.
        assert stats["exits"] < iterations * 1.2


def test_triple_fault_is_a_typed_error() -> None:
    with testguest.start(Mode.FAULT, a=Fault.TRIPLE_NATIVE) as m:
        with pytest.raises(GuestCrashed) as info:
            m.wait(timeout=10)
    error = info.value
    assert error.reason == "shutdown"
    assert error.vcpu == 0
    assert 0x100000 <= error.registers["rip"] < 0x110000
    assert "faulting on purpose" in error.console


def test_emulation_failure_is_a_typed_error() -> None:
    if not is_pvm():
        pytest.skip("int $0x42 is an ordinary interrupt on hardware KVM")
    with testguest.start(Mode.FAULT, a=Fault.BAD_INT_NATIVE) as m:
        with pytest.raises(GuestCrashed) as info:
            m.wait(timeout=10)
    assert info.value.reason == "internal-error"
    assert "faulting on purpose" in str(info.value)


def test_triple_fault_in_emulated_mode() -> None:
    with testguest.start(Mode.FAULT, a=Fault.TRIPLE_EMULATED) as m:
        with pytest.raises(GuestCrashed) as info:
            m.wait(timeout=10)
    assert info.value.reason == "shutdown"
    assert info.value.registers["cs"] == EMULATED_CS


def test_wait_times_out_and_close_stops_a_running_guest() -> None:
    m = testguest.start(Mode.COUNTER, vcpus=2, a=0)
    assert m.wait(timeout=0.05) is None
    started = time.monotonic()
    m.close()
    assert time.monotonic() - started < 5
    with pytest.raises(MachineClosed):
        m.wait(timeout=0)
    with pytest.raises(MachineClosed):
        m.pause()
    m.close()  # idempotent


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError):
        _core.Machine(memory_mib=64, vcpus=0)
    with pytest.raises(ValueError):
        _core.Machine(memory_mib=64, vcpus=9)
    with pytest.raises(ValueError):
        _core.Machine(memory_mib=1, vcpus=1)
    with _core.Machine(memory_mib=64, vcpus=1) as m:
        with pytest.raises(ValueError, match="cannot open"):
            m.load_test_guest("/nonexistent/guest.elf", [])
        with pytest.raises(ValueError, match="not an ELF"):
            m.load_test_guest(__file__, [])
        with pytest.raises(IndexError):
            m.read_memory(64 << 20, 1)
        with pytest.raises(IndexError):
            m.vcpu_stats(1)


def process_footprint() -> tuple[int, int, int]:
    fds = len(os.listdir("/proc/self/fd"))
    threads = len(os.listdir("/proc/self/task"))
    with open("/proc/self/statm") as f:
        rss_pages = int(f.read().split()[1])
    return fds, threads, rss_pages * os.sysconf("SC_PAGE_SIZE")


def test_200_machines_leave_no_trace() -> None:
    _core.vm_pool_clear()  # machines other tests left prepared are not ours to count

    def one() -> None:
        with testguest.start(Mode.COUNTER, vcpus=2, a=1000, b=1000) as m:
            assert m.wait(timeout=10) == 0

    for _ in range(20):  # warm up allocator and caches
        one()
    fds, threads, rss = process_footprint()
    for _ in range(200):
        one()
    fds_after, threads_after, rss_after = process_footprint()
    assert fds_after == fds
    assert threads_after == threads
    assert rss_after - rss < 16 << 20, f"RSS grew by {(rss_after - rss) >> 20} MiB over 200 machines"
