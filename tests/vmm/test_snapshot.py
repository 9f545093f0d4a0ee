"""Snapshot and restore on the real /dev/kvm with the counting test guest."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from cellvm import _core, testguest
from cellvm.errors import DeadlineExceeded, SnapshotCorrupt, SnapshotIncompatible
from cellvm.machine import Machine
from cellvm.snapshot import Snapshot
from cellvm.testguest import Mode, counters, read_results, wait_for_progress
from support.counting import PVM, pause_where_it_left_off, saved_counters

pytestmark = pytest.mark.usefixtures("kvm")


def counting_machine(vcpus: int = 2) -> Machine:
    m = Machine(memory_mib=64, vcpus=vcpus)
    m.load_test_guest(testguest.path(), testguest.params(Mode.COUNTER, vcpus, 0, 0, native=PVM))
    m.start()
    deadline = time.monotonic() + 10
    while not all(read_results(m.core).counters[:vcpus]):
        assert time.monotonic() < deadline
        time.sleep(0.001)
    return m


@pytest.fixture
def snapshot(tmp_path: Path) -> Snapshot:
    with counting_machine() as m:
        time.sleep(0.2)  # counts well past what a restarted guest would reach quickly
        snap = m.snapshot(tmp_path / "snap", resume=False)
    return snap


def test_restore_20_times_continues_natively(snapshot: Snapshot) -> None:
    at_snapshot = saved_counters(snapshot)
    assert all(at_snapshot)
    for _ in range(20):
        with Machine.restore(snapshot) as clone:
            now = pause_where_it_left_off(clone, at_snapshot)
            emulated = [clone.vcpu_stats(i)["insn_emulation"] for i in range(2)]
            clone.resume()
            wait_for_progress(clone, now)
            if PVM:
                # Restored straight into native mode: nothing runs emulated
                # but the odd instruction the host emulates after preempting us.
                assert all(e < 50 for e in emulated), emulated


def test_diff_snapshot_of_a_restored_machine(snapshot: Snapshot, tmp_path: Path) -> None:
    with Machine.restore(snapshot) as clone:
        wait_for_progress(clone, (1, 1))
        diff = clone.snapshot(tmp_path / "diff", resume=False)
        at_diff = counters(clone)
    assert diff.is_diff and diff.parent is not None and diff.parent.path == snapshot.path
    # Only the pages the guest wrote since the restore: counters, stack, vif pages.
    assert diff.metadata["pages_written"] < 16
    assert os.stat(diff.path / "memory.bin").st_blocks * 512 < 256 << 10
    with Machine.restore(diff) as again:
        again.pause()
        assert all(n >= s for n, s in zip(counters(again), at_diff))
        again.resume()
        wait_for_progress(again, at_diff)
        second = again.snapshot(tmp_path / "diff2", resume=True)
    assert [p.parent.name for p in second.memory_layers()] == ["snap", "diff", "diff2"]
    flat = second.flatten(tmp_path / "flat")
    assert not flat.is_diff and flat.memory_layers() == [flat.path / "memory.bin"]
    with Machine.restore(flat) as from_flat:
        wait_for_progress(from_flat, at_diff)


def test_forks_run_at_once_and_diverge() -> None:
    marker_gpa = 0x300000  # free guest memory, untouched by the test guest
    with counting_machine() as original:
        forks = original.fork(8)
        try:
            for i, fork in enumerate(forks):
                fork.write_memory(marker_gpa, bytes([i + 1]) * 8)
            for i, fork in enumerate(forks):
                assert fork.read_memory(marker_gpa, 8) == bytes([i + 1]) * 8
                wait_for_progress(fork, counters(fork))
            assert original.read_memory(marker_gpa, 8) == bytes(8)
            # Each fork counts on its own: no two are at the same counts.
            for fork in forks:
                fork.pause()
            seen = {counters(fork) for fork in forks}
            assert len(seen) == 8
        finally:
            for fork in forks:
                fork.close()


def corrupt(snapshot: Snapshot, name: str, offset: int, data: bytes) -> None:
    with open(snapshot.path / name, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_corrupt_state_is_rejected(snapshot: Snapshot) -> None:
    with open(snapshot.path / "state.bin", "rb") as f:
        size = len(f.read())
    corrupt(snapshot, "state.bin", size // 2, b"\xff\xfe\xfd")
    with pytest.raises(SnapshotCorrupt, match="checksum"):
        Machine.restore(snapshot)
    with pytest.raises(SnapshotCorrupt):
        Snapshot.open(snapshot.path).verify()


def test_truncated_files_are_rejected(snapshot: Snapshot) -> None:
    os.truncate(snapshot.path / "memory.bin", snapshot.memory_bytes // 2)
    with pytest.raises(SnapshotCorrupt, match="truncated"):
        Machine.restore(snapshot)
    os.truncate(snapshot.path / "state.bin", 100)
    with pytest.raises(SnapshotCorrupt):
        Machine.restore(snapshot)


def test_wrong_version_is_rejected(snapshot: Snapshot) -> None:
    corrupt(snapshot, "state.bin", 8, (99).to_bytes(4, "little"))
    with pytest.raises(SnapshotIncompatible, match="format 99"):
        Machine.restore(snapshot)
    metadata = (snapshot.path / "metadata.json").read_text().replace('"format": 1', '"format": 2')
    (snapshot.path / "metadata.json").write_text(metadata)
    with pytest.raises(SnapshotIncompatible):
        Machine.restore(snapshot.path)


def test_wrong_backend_is_rejected(snapshot: Snapshot) -> None:
    here = _core.hypervisor_info()["backend"]
    other = "kvm" if here == "pvm" else "pvm"
    metadata = (snapshot.path / "metadata.json").read_text().replace(f'"backend": "{here}"', f'"backend": "{other}"')
    (snapshot.path / "metadata.json").write_text(metadata)
    with pytest.raises(SnapshotIncompatible, match=other):
        Machine.restore(snapshot.path)


def test_a_vcpu_failing_its_state_gives_the_deadline_error(snapshot: Snapshot) -> None:
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded) as info:
        _core.Machine.restore_snapshot(
            str(snapshot.path / "state.bin"),
            [str(p) for p in snapshot.memory_layers()],
            timeout=1.0,
            inject_apply_failure=1,
        )
    assert info.value.vcpu == 1
    assert time.monotonic() - started < 5
