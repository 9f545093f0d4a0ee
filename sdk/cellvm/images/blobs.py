"""The content-addressed blob cache: blobs/sha256/<hex>, verified while downloading.

A blob appears under its digest only by an atomic rename after its bytes
hashed to that digest, so whatever is in blobs/ is valid, whenever a pull
was interrupted. Partial downloads live in tmp/<hex>.partial and are
resumed with an HTTP Range request; one process at a time writes a given
blob (an flock per digest), the others wait and then find it in place.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import BinaryIO, Protocol

import anyio
import httpx

from cellvm.errors import DigestMismatch, RegistryUnavailable
from cellvm.images.locks import file_lock
from cellvm.images.registry import RangeNotSatisfiable, RetryPolicy, TransientError, describe_transport_error

ProgressCallback = Callable[[int], None]
CHUNK = 1024 * 1024


class BlobSource(Protocol):
    """Where blob bytes come from: a registry, an OCI layout directory, an archive."""

    def open(self, digest: str, offset: int) -> AbstractAsyncContextManager[tuple[AsyncIterator[bytes], int]]:
        """Stream ``digest`` from ``offset``; yields (chunks, offset actually served)."""
        ...


def atomic_write(path: Path, data: bytes, tmp_dir: Path) -> None:
    """Write ``data`` to ``path`` so readers see all of it or nothing, even with concurrent writers."""
    fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix=path.name + ".")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def hex_of(digest: str) -> str:
    algorithm, _, hex_part = digest.partition(":")
    if algorithm != "sha256" or len(hex_part) != 64:
        raise DigestMismatch(f"unsupported digest {digest!r}")
    return hex_part


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs_dir = root / "blobs" / "sha256"
        self.tmp_dir = root / "tmp"
        self.locks_dir = root / "locks"

    def path(self, digest: str) -> Path:
        return self.blobs_dir / hex_of(digest)

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def read_bytes(self, digest: str) -> bytes:
        return self.path(digest).read_bytes()

    def put_bytes(self, digest: str, data: bytes) -> Path:
        """Store a small blob we already hold in memory (manifests, configs), verified."""
        actual = "sha256:" + hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise DigestMismatch(f"content for {digest} hashes to {actual}")
        final = self.path(digest)
        if not final.exists():
            self._make_dirs()
            atomic_write(final, data, self.tmp_dir)
        return final

    def _make_dirs(self) -> None:
        for directory in (self.blobs_dir, self.tmp_dir, self.locks_dir):
            directory.mkdir(parents=True, exist_ok=True)

    async def ensure(
        self,
        digest: str,
        size: int,
        source: BlobSource,
        *,
        retry: RetryPolicy | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> bool:
        """Make sure ``digest`` is in the cache; True if bytes were moved for it."""
        if self.has(digest):
            return False
        await anyio.to_thread.run_sync(self._make_dirs)
        async with file_lock(self.locks_dir / f"{hex_of(digest)}.lock"):
            if self.has(digest):  # another process finished it while we waited
                return False
            await self._download(digest, size, source, retry or RetryPolicy(), on_progress or (lambda n: None))
            return True

    async def _download(
        self, digest: str, size: int, source: BlobSource, retry: RetryPolicy, on_progress: ProgressCallback
    ) -> None:
        path = self.tmp_dir / f"{hex_of(digest)}.partial"
        partial = await anyio.to_thread.run_sync(PartialFile.open, path)
        try:
            if partial.length > size:
                await anyio.to_thread.run_sync(partial.truncate)
            if partial.length:
                on_progress(partial.length)
            delays = retry.delays()
            failures = 0
            while True:
                length_before = partial.length
                try:
                    await self._stream_into(digest, size, source, partial, on_progress)
                    break
                except DigestMismatch:
                    partial.file.close()
                    path.unlink(missing_ok=True)  # its bytes are wrong: the next pull starts over
                    raise
                except (httpx.TransportError, TransientError) as exc:
                    if isinstance(exc, RangeNotSatisfiable):
                        on_progress(-partial.length)
                        await anyio.to_thread.run_sync(partial.truncate)
                    if partial.length > length_before:
                        failures = 0  # it was making progress: a flaky link, not a dead registry
                    if failures == len(delays):
                        raise RegistryUnavailable(
                            f"blob {digest}: {describe_transport_error(exc)} (after {retry.attempts} tries;"
                            f" {partial.length} of {size} bytes kept for the next pull)"
                        ) from exc
                    await anyio.sleep(delays[failures])
                    failures += 1
            actual = "sha256:" + partial.hasher.hexdigest()
            if actual != digest or partial.length != size:
                got = partial.length
                partial.file.close()
                path.unlink(missing_ok=True)
                raise DigestMismatch(f"blob {digest}: got {got} bytes hashing to {actual} (expected {size} bytes)")
            await anyio.to_thread.run_sync(partial.sync_and_close)
            os.replace(path, self.path(digest))
        finally:
            partial.file.close()

    async def _stream_into(
        self, digest: str, size: int, source: BlobSource, partial: PartialFile, on_progress: ProgressCallback
    ) -> None:
        offset = partial.length
        if offset == size and offset > 0:
            return  # everything arrived before the interruption; only the rename was missing
        async with source.open(digest, offset) as (chunks, served):
            if served != offset:
                # The source ignored our Range: restart the file from the bytes it sends.
                on_progress(-offset)
                await anyio.to_thread.run_sync(partial.truncate)
            # Network reads are ~64 KiB; hand them to the worker thread (write + hash) in
            # batches of about 1 MiB, without joining them into one buffer first.
            batch: list[bytes] = []
            batched = 0
            try:
                async for chunk in chunks:
                    if partial.length + batched + len(chunk) > size:
                        batch.clear()
                        raise DigestMismatch(f"blob {digest}: more than the {size} bytes its descriptor declares")
                    batch.append(chunk)
                    batched += len(chunk)
                    if batched >= CHUNK:
                        await anyio.to_thread.run_sync(partial.append, batch)
                        on_progress(batched)
                        batch, batched = [], 0
            finally:
                if batch:  # also on a broken connection: what arrived is kept for the resume
                    await anyio.to_thread.run_sync(partial.append, batch)
                    on_progress(batched)


class PartialFile:
    """A download in progress: the file, its length and the running hash of its bytes."""

    def __init__(self, file: BinaryIO, hasher: hashlib._Hash, length: int) -> None:
        self.file = file
        self.hasher = hasher
        self.length = length

    @classmethod
    def open(cls, path: Path) -> PartialFile:
        """Open (or create) a partial download and hash what an earlier pull left in it."""
        file = open(path, "a+b")  # noqa: SIM115 - closed by the owner
        file.seek(0)
        hasher = hashlib.sha256()
        length = 0
        while block := file.read(CHUNK):
            hasher.update(block)
            length += len(block)
        return cls(file, hasher, length)

    def truncate(self) -> None:
        self.file.truncate(0)
        self.hasher = hashlib.sha256()
        self.length = 0

    def append(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.file.write(chunk)
            self.hasher.update(chunk)
            self.length += len(chunk)

    def sync_and_close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
