"""Restores from machines prepared in advance (csrc/vm/vm_pool.h): the pool
changes how fast a restore is, never what it restores. No timing asserts:
speed is benchmarks/restore.py's business."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from cellvm import _core, testguest
from cellvm.errors import HypervisorError, SnapshotCorrupt
from cellvm.machine import Machine
from cellvm.snapshot import Snapshot
from cellvm.testguest import Mode, counters, wait_for_progress
from support.counting import PVM, pause_where_it_left_off, saved_counters

pytestmark = pytest.mark.usefixtures("kvm")


@pytest.fixture(autouse=True)
def empty_pool() -> Iterator[None]:
    _core.vm_pool_clear()
    yield
    _core.vm_pool_clear()
    assert _core.vm_pool_status() == []


@pytest.fixture
def snapshot(tmp_path: Path) -> Snapshot:
    with Machine(memory_mib=64, vcpus=2) as m:
        m.load_test_guest(testguest.path(), testguest.params(Mode.COUNTER, 2, 0, 0, native=PVM))
        m.start()
        wait_for_progress(m, (1000, 1000))
        return m.snapshot(tmp_path / "snap", resume=False)


def phases(m: Machine) -> list[str]:
    return [name for name, _ in m.restore_phases()]


@pytest.mark.parametrize("premap", [False, True], ids=["shape", "premapped"])
def test_a_prepared_machine_restores_the_same_state(snapshot: Snapshot, premap: bool) -> None:
    at_snapshot = saved_counters(snapshot)
    assert all(n > 1000 for n in at_snapshot)
    Machine.prepare_restores(snapshot, 2, premap=premap)
    assert Machine.wait_prepared(snapshot, 2, premap=premap) == 2
    for _ in range(3):  # the worker refills behind each restore
        Machine.wait_prepared(snapshot, 1, premap=premap)
        with Machine.restore(snapshot) as clone:
            assert "pool_take" in phases(clone)
            assert ("memory_map" in phases(clone)) == (not premap)  # premapped: the images are already there
            assert ("state_read" in phases(clone)) == (not premap)  # and the state is in place
            now = pause_where_it_left_off(clone, at_snapshot)
            clone.resume()
            wait_for_progress(clone, now)


def test_without_a_prepared_machine_restore_builds_one(snapshot: Snapshot) -> None:
    with Machine.restore(snapshot) as clone:
        assert "pool_take" not in phases(clone)
        assert {"memory_map", "vm_create", "memslot", "irqchip", "vcpus_cpuid", "vcpu_apply"} <= set(phases(clone))
        assert clone.restore_started > 0
        wait_for_progress(clone, counters(clone))
    with Machine(memory_mib=64) as cold:
        assert cold.restore_phases() == []


def test_prepared_clones_are_isolated(snapshot: Snapshot) -> None:
    marker = 0x300000
    Machine.prepare_restores(snapshot, 2, premap=True)
    Machine.wait_prepared(snapshot, 2, premap=True)
    a, b = Machine.restore(snapshot), Machine.restore(snapshot)
    try:
        assert "pool_take" in phases(a) and "pool_take" in phases(b)
        a.write_memory(marker, b"\x11" * 8)
        b.write_memory(marker, b"\x22" * 8)
        assert a.read_memory(marker, 8) == b"\x11" * 8
        assert b.read_memory(marker, 8) == b"\x22" * 8
    finally:
        a.close()
        b.close()
    with Machine.restore(snapshot) as c:
        assert c.read_memory(marker, 8) == bytes(8)


def test_a_diff_chain_restores_over_a_prepared_machine(snapshot: Snapshot, tmp_path: Path) -> None:
    marker = 0x300000
    with Machine.restore(snapshot) as clone:
        clone.write_memory(marker, b"diff-one")
        wait_for_progress(clone, counters(clone))
        diff = clone.snapshot(tmp_path / "diff", resume=False)
        at_diff = counters(clone)
    assert diff.is_diff
    for premap in (False, True):
        Machine.prepare_restores(diff, 1, premap=premap)
        Machine.wait_prepared(diff, 1, premap=premap)
        with Machine.restore(diff) as again:
            assert "pool_take" in phases(again)
            assert again.read_memory(marker, 8) == b"diff-one"
            again.pause()
            assert all(n >= s for n, s in zip(counters(again), at_diff))
            again.resume()
            wait_for_progress(again, at_diff)
        Machine.prepare_restores(diff, 0, premap=premap)


def test_a_truncated_image_fails_over_a_prepared_machine(snapshot: Snapshot) -> None:
    Machine.prepare_restores(snapshot, 1, premap=False)
    Machine.wait_prepared(snapshot, 1, premap=False)
    os.truncate(snapshot.path / "memory.bin", snapshot.memory_bytes // 2)
    with pytest.raises(SnapshotCorrupt, match="truncated"):
        Machine.restore(snapshot)


def test_targets_can_be_dropped(snapshot: Snapshot) -> None:
    Machine.prepare_restores(snapshot, 3, premap=False)
    assert Machine.wait_prepared(snapshot, 3, premap=False) == 3
    [entry] = _core.vm_pool_status()
    assert (entry["memory_mib"], entry["vcpus"], entry["layers"], entry["ready"]) == (64, 2, [], 3)
    Machine.prepare_restores(snapshot, 1, premap=False)
    assert _core.vm_pool_status()[0]["ready"] == 1
    Machine.prepare_restores(snapshot, 0, premap=False)
    assert _core.vm_pool_status() == []
    with Machine.restore(snapshot) as clone:
        assert "pool_take" not in phases(clone)


def test_a_prepared_machine_of_another_shape_is_not_used(snapshot: Snapshot) -> None:
    _core.vm_pool_set_target(128, 2, [], 1)
    _core.vm_pool_wait(128, 2, [], 1, 10.0)
    with Machine.restore(snapshot) as clone:
        assert "pool_take" not in phases(clone)
    assert _core.vm_pool_status()[0]["ready"] == 1


def test_a_corrupt_state_fails_its_prepared_machines_and_the_restore(snapshot: Snapshot) -> None:
    size = os.path.getsize(snapshot.path / "state.bin")
    with open(snapshot.path / "state.bin", "r+b") as f:
        f.seek(size // 2)
        f.write(b"\xff\xfe\xfd")
    Machine.prepare_restores(snapshot, 1, premap=True)
    with pytest.raises(HypervisorError, match="checksum"):
        Machine.wait_prepared(snapshot, 1, premap=True)
    with pytest.raises(SnapshotCorrupt, match="checksum"):
        Machine.restore(snapshot)


def test_prestated_machines_serve_forks_of_one_snapshot(snapshot: Snapshot) -> None:
    at_snapshot = saved_counters(snapshot)
    Machine.prepare_restores(snapshot, 4, premap=True)
    assert Machine.wait_prepared(snapshot, 4, premap=True) == 4
    clones = [Machine.restore(snapshot) for _ in range(4)]
    try:
        for clone in clones:
            assert "pool_take" in phases(clone) and "state_read" not in phases(clone)
        for clone in clones:
            wait_for_progress(clone, at_snapshot)
        for clone in clones:
            clone.pause()
        assert len({counters(c) for c in clones}) == 4  # each counts on its own
    finally:
        for clone in clones:
            clone.close()


def test_a_working_set_is_copied_ahead_and_changes_nothing(snapshot: Snapshot, tmp_path: Path) -> None:
    marker = 0x300000
    at_snapshot = saved_counters(snapshot)
    with Machine.restore(snapshot) as first:
        wait_for_progress(first, counters(first))
        touched = first.resident_pages(private_only=True)  # the pages it wrote
        resident = first.resident_pages()
        first.write_working_set(str(tmp_path / "ws"))
    assert touched and all(count > 0 for _, count in touched)
    assert sum(count for _, count in touched) < sum(count for _, count in resident)
    # The working set: every page touched, except in 2 MiB blocks touched
    # whole and never written (left to the host's 2 MiB file mapping).
    written = {page for start, count in touched for page in range(start, start + count)}
    present = [page for start, count in resident for page in range(start, start + count)]
    whole = {block for block in {p // 512 for p in present} if sum(p // 512 == block for p in present) == 512}
    skipped = whole - {page // 512 for page in written}
    expected = [page for page in present if page // 512 not in skipped]
    raw = (tmp_path / "ws").read_bytes()
    runs = [struct.unpack_from("<QQ", raw, at) for at in range(0, len(raw), 16)]
    assert [page for start, count in runs for page in range(start, start + count)] == expected
    assert written <= set(expected)
    Machine.prepare_restores(snapshot, 2, working_set=tmp_path / "ws")
    assert Machine.wait_prepared(snapshot, 2) == 2
    a, b = Machine.restore(snapshot), Machine.restore(snapshot)
    try:
        assert "pool_take" in phases(a) and "pool_take" in phases(b)
        resident = {p for first_page, count in a.resident_pages(private_only=True) for p in range(first_page, first_page + count)}
        assert {page for first_page, count in touched for page in range(first_page, first_page + count)} <= resident
        a.write_memory(marker, b"\x11" * 8)  # copied pages are still each machine's own
        b.write_memory(marker, b"\x22" * 8)
        assert a.read_memory(marker, 8) == b"\x11" * 8 and b.read_memory(marker, 8) == b"\x22" * 8
        for clone in (a, b):
            now = counters(clone)
            assert all(n >= s for n, s in zip(now, at_snapshot)), (now, at_snapshot)
            wait_for_progress(clone, now)
    finally:
        a.close()
        b.close()


def test_a_restore_without_a_prepared_machine_copies_the_working_set_itself(snapshot: Snapshot, tmp_path: Path) -> None:
    with Machine.restore(snapshot) as first:
        wait_for_progress(first, counters(first))
        first.write_working_set(str(tmp_path / "ws"))
    raw = (tmp_path / "ws").read_bytes()
    wanted = {p for at in range(0, len(raw), 16) for start, count in [struct.unpack_from("<QQ", raw, at)] for p in range(start, start + count)}
    assert wanted
    with Machine.restore(snapshot, working_set=tmp_path / "ws") as clone:
        assert "working_set" in phases(clone) and "pool_take" not in phases(clone)
        private = {p for start, count in clone.resident_pages(private_only=True) for p in range(start, start + count)}
        assert wanted <= private  # copied before the guest ran, not just what it wrote since
        wait_for_progress(clone, counters(clone))
        clone.write_memory(0x300000, b"\x33" * 8)
        diff = clone.snapshot(tmp_path / "diff")
    kept = saved_counters(diff)  # the counts at the snapshot: their page changed, so it is in the diff
    assert all(kept), kept
    # The copies the guest never changed are not in the diff; what changed is.
    assert diff.metadata["pages_written"] < len(wanted)
    with Machine.restore(diff) as again:
        assert again.read_memory(0x300000, 8) == b"\x33" * 8
        now = counters(again)
        assert all(n >= k for n, k in zip(now, kept)), (now, kept)
        wait_for_progress(again, now)
    with Machine.restore(snapshot) as plain:
        assert "working_set" not in phases(plain)


def test_a_working_set_beyond_memory_or_missing_is_harmless(snapshot: Snapshot, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.write_bytes((1 << 40).to_bytes(8, "little") + (5).to_bytes(8, "little") + b"\x01\x02")  # beyond RAM, then a torn record
    Machine.prepare_restores(snapshot, 1, working_set=ws)
    assert Machine.wait_prepared(snapshot, 1) == 1
    with Machine.restore(snapshot) as clone:
        wait_for_progress(clone, counters(clone))
    Machine.prepare_restores(snapshot, 0)
    Machine.prepare_restores(snapshot, 1, working_set=tmp_path / "missing")
    with pytest.raises(HypervisorError, match="working set"):
        Machine.wait_prepared(snapshot, 1)
