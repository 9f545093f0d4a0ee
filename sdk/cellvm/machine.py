"""A microVM at the lowest level the SDK offers: the C++ machine plus
snapshots, restore and fork. Sandbox builds on this; tests and benchmarks
use it directly with the test guests.

    m = Machine(memory_mib=64, vcpus=2)
    m.load_test_guest(testguest.path(), params)
    m.start()
    snap = m.snapshot()              # pause, save, resume
    clone = Machine.restore(snap)    # a new machine continuing from it
    forks = m.fork(8)                # 8 machines continuing from now
"""

from __future__ import annotations

import atexit
import os
import socket
from collections.abc import Sequence
from typing import Any

import anyio

from cellvm import _core
from cellvm.errors import HypervisorError
from cellvm.snapshot import Snapshot, take

# Prepared machines (see Machine.prepare_restores) own threads: close them
# while the interpreter is still whole.
atexit.register(_core.vm_pool_clear)


class Machine:
    """A microVM: guest memory, vCPU threads, devices. Blocking methods
    release the GIL; async code calls them through anyio.to_thread."""

    def __init__(self, *, memory_mib: int = 64, vcpus: int = 1) -> None:
        self._core = _core.Machine(memory_mib=memory_mib, vcpus=vcpus)
        self._parent: Snapshot | None = None
        self._devices: list[dict[str, Any]] = []

    @classmethod
    def _wrap(cls, core: _core.Machine, parent: Snapshot | None, devices: list[dict[str, Any]]) -> Machine:
        machine = cls.__new__(cls)
        machine._core = core
        machine._parent = parent
        machine._devices = devices
        return machine

    # ---------------------------------------------------------------- devices

    def add_device(self, kind: str, *, path: str | os.PathLike[str] | None = None, read_only: bool = True) -> int:
        """Attach a virtio device before load_linux(): "console" (the agent
        channel; see console_socket), "block" (a disk image at `path`) or
        "rng". Returns the device's index."""
        spec: dict[str, Any] = {"kind": kind, "read_only": read_only}
        if path is not None:
            spec["path"] = str(path)
        index = self._core.add_device(spec)
        self._devices.append(spec)
        return index

    def console_socket(self, index: int) -> socket.socket:
        """The host end of console device `index` as a socket (yours to close)."""
        return socket.socket(fileno=self._core.console_socket(index))

    @property
    def devices(self) -> list[dict[str, Any]]:
        return list(self._devices)

    # ---------------------------------------------------------------- snapshots

    def snapshot(
        self, path: str | os.PathLike[str] | None = None, *, resume: bool = True, timeout: float = 1.0
    ) -> Snapshot:
        """Pause every vCPU, save the machine, resume (unless resume=False).

        With no path the snapshot goes to tmpfs. A machine that was itself
        restored writes a diff: only the pages written since, over its parent.
        """
        snapshot = take(self._core, path, parent=self._parent, devices=self._devices, resume=resume, timeout=timeout)
        return snapshot

    @classmethod
    def restore(
        cls,
        snapshot: Snapshot | str | os.PathLike[str],
        *,
        timeout: float = 1.0,
        working_set: str | os.PathLike[str] | None = None,
    ) -> Machine:
        """A new running machine that continues from `snapshot`. Raises
        SnapshotCorrupt / SnapshotIncompatible before any vCPU runs, and
        DeadlineExceeded naming the vCPU if one fails to take its state.
        `working_set` (from ``write_working_set()`` of an earlier restore of
        this snapshot) is copied ahead unless a prepared machine serves the
        restore (those copied it already)."""
        if not isinstance(snapshot, Snapshot):
            snapshot = Snapshot.open(snapshot)
        devices = list(snapshot.metadata.get("devices", []))
        state, layers = snapshot.restore_paths
        core = _core.Machine.restore_snapshot(
            state,
            list(layers),
            devices=devices,
            timeout=timeout,
            working_set=str(working_set) if working_set is not None else "",
        )
        return cls._wrap(core, snapshot, devices)

    @staticmethod
    def _pool_key(snapshot: Snapshot | str | os.PathLike[str], premap: bool) -> tuple[int, int, list[str], str]:
        if not isinstance(snapshot, Snapshot):
            snapshot = Snapshot.open(snapshot)
        if not premap:
            return snapshot.memory_bytes >> 20, snapshot.vcpus, [], ""
        state, layers = snapshot.restore_paths
        # A restore that attaches devices sets their state itself: only the memory is prepared then.
        if snapshot.metadata.get("devices"):
            state = ""
        return snapshot.memory_bytes >> 20, snapshot.vcpus, list(layers), state

    @classmethod
    def prepare_restores(
        cls,
        snapshot: Snapshot | str | os.PathLike[str],
        count: int,
        *,
        premap: bool = True,
        working_set: str | os.PathLike[str] | None = None,
    ) -> None:
        """Keep `count` machines prepared for restores of `snapshot`: a
        background thread creates the VM, memslot, irqchip, vCPUs (CPUID) and
        vCPU threads ahead of time, so `restore` only maps memory, sets state
        and runs; it uses them automatically and the thread refills behind it.
        premap=True: the snapshot's memory is mapped ahead too (for restores of
        this snapshot only; with no virtio devices its state is read and
        applied ahead as well, so the restore only sets the clock and TSCs);
        premap=False: for any snapshot of its shape
        (memory size, vCPUs). 0 drops them. Each costs a VM's kernel memory
        and idle threads while it waits. With premap, `working_set` (a file
        from ``write_working_set()`` of an earlier restore of this snapshot)
        names pages each prepared machine copies ahead, so the restored guest
        does not take copy-on-write faults on them (they then count as its
        memory while it waits)."""
        mib, vcpus, layers, state = cls._pool_key(snapshot, premap)
        ws = str(working_set) if working_set is not None and premap else ""
        _core.vm_pool_set_target(mib, vcpus, layers, count, state=state, working_set=ws)

    @classmethod
    def wait_prepared(
        cls, snapshot: Snapshot | str | os.PathLike[str], count: int, *, premap: bool = True, timeout: float = 10.0
    ) -> int:
        """Block until `count` prepared machines (see prepare_restores) are
        ready or `timeout` seconds passed; returns how many are. Raises
        HypervisorError if building them failed."""
        mib, vcpus, layers, state = cls._pool_key(snapshot, premap)
        ready = _core.vm_pool_wait(mib, vcpus, layers, count, timeout, state=state)
        for entry in _core.vm_pool_status():
            key = (entry["memory_mib"], entry["vcpus"], entry["layers"], entry["state"])
            if key == (mib, vcpus, layers, state) and entry["error"]:
                raise HypervisorError(f"preparing machines for restores failed: {entry['error']}")
        return ready

    def fork(self, n: int, *, timeout: float = 1.0) -> list[Machine]:
        """`n` new machines continuing from this one's current state (which
        keeps running). They share the snapshot's pages copy-on-write."""
        if n < 1:
            raise ValueError("fork needs n >= 1")
        snapshot = self.snapshot(timeout=timeout)
        try:
            return [Machine.restore(snapshot, timeout=timeout) for _ in range(n)]
        finally:
            # The clones map memory.bin privately; the file can go at once,
            # unless it is a link in a chain a later diff would need.
            if not snapshot.is_diff:
                snapshot.remove()

    # ---------------------------------------------------------------- the machine

    def load_test_guest(self, path: str | os.PathLike[str], params: Sequence[int]) -> None:
        self._core.load_test_guest(str(path), list(params))

    def load_linux(self, vmlinux: str | os.PathLike[str], initrd: str | os.PathLike[str] = "", cmdline: str = "") -> None:
        self._core.load_linux(str(vmlinux), str(initrd), cmdline)

    def start(self) -> None:
        self._core.start()

    def wait(self, timeout: float) -> int | None:
        return self._core.wait(timeout)

    async def wait_async(self, timeout: float) -> int | None:
        return await anyio.to_thread.run_sync(self._core.wait, timeout)

    def pause(self, timeout: float = 1.0) -> list[dict[str, int] | None]:
        return self._core.pause(timeout)

    def resume(self) -> None:
        self._core.resume()

    def close(self) -> None:
        self._core.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def core(self) -> _core.Machine:
        """The C++ machine, for what this class does not wrap."""
        return self._core

    @property
    def parent(self) -> Snapshot | None:
        """The snapshot this machine was restored from, if any."""
        return self._parent

    def __getattr__(self, name: str) -> Any:
        # Everything else (console, reports, read_memory, vcpu_stats, backend,
        # vcpus, memory_size, tsc_khz, stopped, ...) is the C++ machine's.
        return getattr(self._core, name)
