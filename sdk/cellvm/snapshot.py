"""Snapshots on disk: a directory the VMM wrote while every vCPU was paused.

    <dir>/metadata.json   format, backend, VM shape, parent, checksums
    <dir>/state.bin       vCPUs, interrupt controllers, clock, devices (checksummed)
    <dir>/memory.bin      sparse guest memory: every touched page (full), or
                          only the pages written since a restore (diff)

A diff snapshot names its parent; restoring it maps the whole chain,
oldest first. A snapshot directory appears under its final name only when
complete (written under a temporary name, fsynced, renamed).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cellvm import _core
from cellvm.guest import file_digest
from cellvm.errors import SnapshotCorrupt, SnapshotError, SnapshotIncompatible

FORMAT = 1
KIND = "cellvm-snapshot"


def default_snapshot_root() -> Path:
    """Where snapshots without a path go: tmpfs when there is one, so a
    fork's snapshot never touches a disk."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    return base / "cellvm-snapshots"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Snapshot:
    """A snapshot directory and its metadata."""

    path: Path
    metadata: dict[str, Any]

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Snapshot:
        """Reads and checks metadata.json (and the parent chain's)."""
        path = Path(path)
        try:
            metadata = json.loads((path / "metadata.json").read_text())
        except FileNotFoundError as e:
            raise SnapshotCorrupt(f"{path} is not a snapshot (no metadata.json)") from e
        except (OSError, ValueError) as e:
            raise SnapshotCorrupt(f"{path}/metadata.json cannot be read: {e}") from e
        if not isinstance(metadata, dict) or metadata.get("kind") != KIND:
            raise SnapshotCorrupt(f"{path}/metadata.json is not cellvm snapshot metadata")
        if metadata.get("format") != FORMAT:
            raise SnapshotIncompatible(
                f"{path} has snapshot format {metadata.get('format')!r}; this cellvm reads {FORMAT}"
            )
        backend = _core.hypervisor_info()["backend"]
        if metadata.get("backend") != backend:
            raise SnapshotIncompatible(
                f"{path} was taken on {metadata.get('backend')!r}; this host is {backend!r}"
            )
        for name in ("state.bin", "memory.bin"):
            if not (path / name).is_file():
                raise SnapshotCorrupt(f"{path} lacks {name}")
        snapshot = cls(path, metadata)
        snapshot.parent  # a diff is only as good as its chain
        return snapshot

    @property
    def parent(self) -> Snapshot | None:
        parent = self.metadata.get("parent")
        return Snapshot.open(parent) if parent else None

    @property
    def is_diff(self) -> bool:
        return bool(self.metadata.get("diff"))

    @property
    def memory_bytes(self) -> int:
        return int(self.metadata["memory_bytes"])

    @property
    def vcpus(self) -> int:
        return int(self.metadata["vcpus"])

    @functools.cached_property
    def restore_paths(self) -> tuple[str, tuple[str, ...]]:
        """(state.bin, the memory layers) as strings for the VMM, worked out
        once per Snapshot object: a snapshot never changes, and on a warm-pool
        restore the path arithmetic alone (and for a diff, reading the chain's
        metadata) was a tenth of the restore."""
        return str(self.path / "state.bin"), tuple(str(p) for p in self.memory_layers())

    def memory_layers(self) -> list[Path]:
        """Memory images to map, full image first, this snapshot's last."""
        chain: list[Path] = []
        node: Snapshot | None = self
        while node is not None:
            chain.append(node.path / "memory.bin")
            node = node.parent if node.is_diff else None
        return list(reversed(chain))

    def verify(self) -> None:
        """Checks state.bin against its recorded digest (memory.bin is only
        size-checked at restore: hashing GiBs would defeat a fast restore)."""
        if file_digest(self.path / "state.bin") != self.metadata.get("state_sha256"):
            raise SnapshotCorrupt(f"{self.path}/state.bin does not match its recorded digest")

    def flatten(self, path: str | os.PathLike[str]) -> Snapshot:
        """A full snapshot at `path` with this chain's memory in one image."""
        final = Path(path)
        with _staging(final) as staging:
            _core.flatten_memory([str(p) for p in self.memory_layers()], self.memory_bytes, str(staging / "memory.bin"))
            shutil.copyfile(self.path / "state.bin", staging / "state.bin")
            metadata = dict(self.metadata, parent=None, diff=False, flattened_from=str(self.path))
            _write_metadata(staging, metadata)
        return Snapshot.open(final)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class _staging:
    """A temporary sibling directory renamed to `final` on success."""

    def __init__(self, final: Path) -> None:
        if final.exists():
            raise SnapshotError(f"{final} already exists")
        final.parent.mkdir(parents=True, exist_ok=True)
        self.final = final
        self.path = final.parent / f".{final.name}.partial-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> Path:
        self.path.mkdir()
        return self.path

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        _fsync_dir(self.path)
        os.rename(self.path, self.final)
        _fsync_dir(self.final.parent)


def _write_metadata(directory: Path, metadata: dict[str, Any]) -> None:
    metadata = dict(metadata, state_sha256=file_digest(directory / "state.bin"))
    target = directory / "metadata.json"
    with target.open("w") as f:
        json.dump(metadata, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def take(
    machine: _core.Machine,
    path: str | os.PathLike[str] | None,
    *,
    parent: Snapshot | None,
    devices: list[dict[str, Any]],
    resume: bool,
    timeout: float,
) -> Snapshot:
    """Writes a snapshot of `machine` (see Machine.snapshot)."""
    final = Path(path) if path is not None else default_snapshot_root() / uuid.uuid4().hex
    with _staging(final) as staging:
        stats = machine.save_snapshot(str(staging), timeout=timeout, resume=resume)
        diff = bool(stats["diff"])
        if diff and parent is None:
            raise SnapshotError("this machine was restored from a snapshot that is no longer known")
        _write_metadata(
            staging,
            {
                "kind": KIND,
                "format": FORMAT,
                "backend": machine.backend,
                "vcpus": machine.vcpus,
                "memory_bytes": machine.memory_size,
                # Restore attaches the same devices (disk images by path).
                "devices": devices,
                "diff": diff,
                "parent": str(parent.path.resolve()) if diff and parent else None,
                "created": datetime.now(timezone.utc).isoformat(),
                "pages_written": int(stats["pages_written"]),
                "pause_seconds": stats["pause_seconds"],
            },
        )
    return Snapshot.open(final)
