"""Checks for the counting test guest (Mode.COUNTER) across snapshot and
restore, shared by the snapshot and VM-pool suites."""

from __future__ import annotations

from cellvm import _core, testguest
from cellvm.machine import Machine
from cellvm.snapshot import Snapshot
from cellvm.testguest import counters

PVM = _core.hypervisor_info()["backend"] == "pvm"


def saved_counters(snapshot: Snapshot) -> tuple[int, ...]:
    """The counts in the snapshot's memory image itself (a restored guest has already counted on)."""
    with open(snapshot.path / "memory.bin", "rb") as f:
        f.seek(testguest.RESULTS_GPA)
        words = f.read(8 * snapshot.vcpus)
    return tuple(int.from_bytes(words[i : i + 8], "little") for i in range(0, len(words), 8))


def pause_where_it_left_off(clone: Machine, at_snapshot: tuple[int, ...]) -> tuple[int, ...]:
    """Pauses a restored clone and checks that it continued from the counts
    `at_snapshot` rather than starting over, and on kvm-pvm that every vCPU
    is back in native mode (its own vif page). Returns the counts; the
    caller resumes the clone."""
    states = clone.pause()
    now = counters(clone)
    assert all(n >= s for n, s in zip(now, at_snapshot)), (now, at_snapshot)
    if PVM:
        for i, state in enumerate(states):
            assert state is not None
            assert state["pvm_native"] == testguest.pvm_native_msr(i)
    return now
