"""The on-disk image store under $CELLVM_CACHE/images.

    blobs/sha256/<hex>        every blob and manifest, content-addressed (blobs.py)
    rootfs/<hex>.<fmt>/       per manifest digest: rootfs.<fmt> + image.json
    refs/<name>.json          which manifest a name (node:24, oci:/dir) pulled last
    tmp/, locks/              partial downloads, unpack dirs, flock files

Every entry is published by an atomic rename, so a reader sees an image
either complete or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio

from cellvm.errors import ImageNotFound
from cellvm.images.blobs import BlobStore, atomic_write, hex_of
from cellvm.images.config import ImageConfig
from cellvm.images.locks import file_lock


def default_cache_dir() -> Path:
    return Path(os.environ.get("CELLVM_CACHE") or Path.home() / ".cache" / "cellvm")


@dataclass(frozen=True)
class Image:
    """A pulled image: its root filesystem image and how to run it."""

    name: str
    digest: str  # manifest digest
    rootfs: Path
    rootfs_format: str
    config: ImageConfig
    size: int  # bytes of the rootfs image
    layers: tuple[str, ...]
    created: float  # when this rootfs was built (epoch seconds)


@dataclass(frozen=True)
class ImageRecord:
    """One line of `cellvm images`."""

    name: str
    digest: str
    size: int
    pulled_at: float


class ImageStore:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or default_cache_dir() / "images"
        self.blobs = BlobStore(self.root)
        self.rootfs_dir = self.root / "rootfs"
        self.refs_dir = self.root / "refs"

    def rootfs_path(self, digest: str, fmt: str) -> Path:
        return self.rootfs_dir / f"{hex_of(digest)}.{fmt}"

    def _ref_path(self, name: str) -> Path:
        return self.refs_dir / (urllib.parse.quote(name, safe="") + ".json")

    # -- images ------------------------------------------------------------------------

    def load_image(self, name: str, digest: str, fmt: str) -> Image | None:
        directory = self.rootfs_path(digest, fmt)
        try:
            meta = json.loads((directory / "image.json").read_text())
        except (OSError, ValueError):
            return None
        image_file = directory / f"rootfs.{fmt}"
        if not image_file.is_file():
            return None
        return Image(
            name=name,
            digest=digest,
            rootfs=image_file,
            rootfs_format=fmt,
            config=ImageConfig.from_json(meta["config"]),
            size=image_file.stat().st_size,
            layers=tuple(meta.get("layers") or ()),
            created=float(meta.get("created", 0)),
        )

    def publish_rootfs(self, staging: Path, digest: str, fmt: str, config: ImageConfig, layers: list[str]) -> None:
        """Move a finished staging dir (holding rootfs.<fmt>) into place with image.json.

        Blocking (it fsyncs the image: a rootfs that a power cut left half-written
        under its final name would fail guests in ways nobody could trace).
        """
        meta: dict[str, Any] = {"digest": digest, "config": config.to_json(), "layers": layers, "created": time.time()}
        (staging / "config.json").unlink(missing_ok=True)
        (staging / "image.json").write_text(json.dumps(meta, indent=2))
        for name in (f"rootfs.{fmt}", "image.json"):
            fd = os.open(staging / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        target = self.rootfs_path(digest, fmt)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # a concurrent builder won the race; theirs is as good as ours
            shutil.rmtree(staging)
            return
        os.rename(staging, target)

    # -- references ----------------------------------------------------------------------

    def record(self, name: str, digest: str, fmt: str, documents: list[str]) -> None:
        self.refs_dir.mkdir(parents=True, exist_ok=True)
        self.blobs.tmp_dir.mkdir(parents=True, exist_ok=True)
        entry = {"name": name, "digest": digest, "format": fmt, "documents": documents, "pulled_at": time.time()}
        atomic_write(self._ref_path(name), json.dumps(entry).encode(), self.blobs.tmp_dir)

    def _refs(self) -> list[dict[str, Any]]:
        refs = []
        for path in sorted(self.refs_dir.glob("*.json")) if self.refs_dir.exists() else ():
            try:
                refs.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
        return refs

    def lookup(self, name: str) -> Image | None:
        """The image ``name`` was last pulled as, if its rootfs is still here."""
        try:
            ref = json.loads(self._ref_path(name).read_text())
        except (OSError, ValueError):
            return None
        return self.load_image(name, ref["digest"], ref.get("format", "erofs"))

    def list(self) -> list[ImageRecord]:
        records = []
        for ref in self._refs():
            path = self.rootfs_path(ref["digest"], ref.get("format", "erofs")) / f"rootfs.{ref.get('format', 'erofs')}"
            size = path.stat().st_size if path.exists() else 0
            records.append(ImageRecord(ref["name"], ref["digest"], size, float(ref.get("pulled_at", 0))))
        return records

    def remove(self, name: str) -> None:
        """Forget a name; its data goes at the next prune if nothing else uses it."""
        path = self._ref_path(name)
        if not path.exists():
            raise ImageNotFound(f"no image named {name!r} in {self.root}")
        path.unlink()

    def in_use(self) -> AbstractAsyncContextManager[None]:
        """Held (shared) by every pull, so prune never deletes what a pull is about to use."""
        return file_lock(self.blobs.locks_dir / "store.lock", shared=True)

    async def prune(self) -> tuple[int, int]:
        """Delete rootfs images, blobs and partial downloads no name refers to;
        returns (files removed, bytes freed). Waits until no pull is running.

        Blobs of images still named are kept (found through their manifests),
        so a re-pull of those stays free.
        """
        async with file_lock(self.blobs.locks_dir / "store.lock"):
            return await anyio.to_thread.run_sync(self._prune_blocking)

    def _prune_blocking(self) -> tuple[int, int]:
        keep_rootfs: set[str] = set()
        keep_blobs: set[str] = set()
        for ref in self._refs():
            keep_rootfs.add(self.rootfs_path(ref["digest"], ref.get("format", "erofs")).name)
            keep_blobs.update(self._blobs_of(ref["digest"]))
            keep_blobs.update(ref.get("documents") or ())
        removed = freed = 0
        for directory in self.rootfs_dir.glob("*") if self.rootfs_dir.exists() else ():
            if directory.name not in keep_rootfs:
                freed += sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
                shutil.rmtree(directory, ignore_errors=True)
                removed += 1
        for blob in self.blobs.blobs_dir.glob("*") if self.blobs.blobs_dir.exists() else ():
            if f"sha256:{blob.name}" not in keep_blobs:
                freed += blob.stat().st_size
                blob.unlink(missing_ok=True)
                removed += 1
        # No pull runs while we hold the store lock: what is in tmp/ was abandoned.
        for leftover in self.blobs.tmp_dir.iterdir() if self.blobs.tmp_dir.exists() else ():
            if leftover.is_dir():
                freed += sum(p.stat().st_size for p in leftover.rglob("*") if p.is_file())
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                freed += leftover.stat().st_size
                leftover.unlink(missing_ok=True)
            removed += 1
        return removed, freed

    def _blobs_of(self, manifest_digest: str) -> set[str]:
        """The manifest, its config and its layers."""
        digests = {manifest_digest}
        try:
            manifest = json.loads(self.blobs.read_bytes(manifest_digest))
            digests.add(manifest["config"]["digest"])
            digests.update(layer["digest"] for layer in manifest.get("layers") or ())
        except (OSError, ValueError, KeyError):
            pass
        return digests
