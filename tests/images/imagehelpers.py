"""Shared helpers for the image tests."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cellvm.images import Image, ImageStore, PullReporter


def extract_rootfs(image: Image, destination: Path) -> Path:
    """Unpack a built rootfs image with the filesystem's own tools (no mount, no root needed)."""
    destination.mkdir(parents=True, exist_ok=True)
    if image.rootfs_format == "erofs":
        tool = shutil.which("fsck.erofs")
        assert tool, "fsck.erofs is missing: install erofs-utils (scripts/apt/images.txt)"
        subprocess.run([tool, f"--extract={destination}", str(image.rootfs)], check=True, capture_output=True)
    else:
        tool = shutil.which("debugfs") or "/usr/sbin/debugfs"
        subprocess.run([tool, "-R", f"rdump / {destination}", str(image.rootfs)], check=True, capture_output=True)
    return destination


def erofs_inode(image: Image, path: str) -> dict[str, str]:
    """dump.erofs's view of one inode (NID, Links, Uid, ...): what extraction does not keep, like hardlinks."""
    tool = shutil.which("dump.erofs")
    assert tool, "dump.erofs is missing: install erofs-utils (scripts/apt/images.txt)"
    output = subprocess.run([tool, f"--path={path}", str(image.rootfs)], check=True, capture_output=True, text=True).stdout
    fields: dict[str, str] = {}
    for line in output.splitlines():
        for key, value in re.findall(r"([A-Za-z][A-Za-z -]*?):\s+(\S+)", line):
            fields.setdefault(key.strip(), value)
    return fields


def assert_cache_valid(store: ImageStore) -> None:
    """Every blob in the cache hashes to its name."""
    for blob in store.blobs.blobs_dir.glob("*") if store.blobs.blobs_dir.exists() else ():
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name, f"corrupt blob in cache: {blob}"


class CountingReporter(PullReporter):
    def __init__(self) -> None:
        self.downloaded: list[str] = []
        self.cached: list[str] = []
        self.bytes = 0
        self.built = False

    def layer_finished(self, digest: str) -> None:
        self.downloaded.append(digest)

    def layer_cached(self, digest: str, size: int) -> None:
        self.cached.append(digest)

    def layer_advanced(self, digest: str, nbytes: int) -> None:
        self.bytes += nbytes

    def building(self, fmt: str) -> None:
        self.built = True


def isolate_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CELLVM_REGISTRIES_CONFIG", str(tmp_path / "no-registries.toml"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))
    monkeypatch.setenv("CELLVM_REGISTRY_FALLBACK", "0")
    monkeypatch.delenv("CELLVM_REGISTRY_MIRRORS", raising=False)
