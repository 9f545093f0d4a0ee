"""Where an image comes from: a registry (through its mirrors), an OCI image
layout directory, or a docker-archive tarball. Each source resolves the
image to one platform manifest and serves blobs by digest."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

import anyio

from cellvm.errors import DigestMismatch, ImageError, ImageNotFound, RegistryUnavailable
from cellvm.images.blobs import CHUNK
from cellvm.images.manifest import (
    DOCKER_CONFIG,
    OCI_MANIFEST,
    Index,
    Manifest,
    Platform,
    parse_manifest_or_index,
    select_platform,
)
from cellvm.images.mirrors import Endpoint
from cellvm.images.reference import Reference, validate_digest
from cellvm.images.registry import RegistryClient

REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"


@dataclass(frozen=True)
class ResolvedManifest:
    """The platform manifest chosen for a pull, plus the documents that led to it."""

    digest: str
    raw: bytes
    manifest: Manifest
    documents: dict[str, bytes]  # digest -> raw bytes of every manifest/index read on the way


class ImageSource(Protocol):
    """Resolves an image to one platform manifest and serves its blobs (a BlobSource)."""

    name: str

    async def resolve(self, platform: Platform) -> ResolvedManifest: ...

    def open(self, digest: str, offset: int) -> AbstractAsyncContextManager[tuple[AsyncIterator[bytes], int]]: ...


async def _resolve_documents(
    fetch: FetchDocument, identifier: str, platform: Platform, where: str
) -> ResolvedManifest:
    raw, content_type, digest = await fetch(identifier)
    documents = {digest: raw}
    document = parse_manifest_or_index(raw, content_type)
    if isinstance(document, Index):
        entry = select_platform(document, platform)
        raw, content_type, digest = await fetch(entry.digest)
        if digest != entry.digest:
            raise DigestMismatch(f"manifest {entry.digest} from {where} hashes to {digest}")
        documents[digest] = raw
        document = parse_manifest_or_index(raw, content_type)
        if isinstance(document, Index):
            raise ImageError(f"{where}: nested index for {platform}")
    return ResolvedManifest(digest, raw, document, documents)


class FetchDocument(Protocol):
    async def __call__(self, identifier: str) -> tuple[bytes, str, str]: ...


class RegistrySource:
    """A registry reached through its configured endpoints, mirrors first."""

    def __init__(self, reference: Reference, client: RegistryClient, endpoints: list[Endpoint]) -> None:
        self.reference = reference
        self.name = reference.familiar
        self.client = client
        self.endpoints = endpoints
        self.endpoint: Endpoint | None = None  # the one that answered

    async def resolve(self, platform: Platform) -> ResolvedManifest:
        failures: list[Exception] = []
        for endpoint in self.endpoints:

            async def fetch(identifier: str, endpoint: Endpoint = endpoint) -> tuple[bytes, str, str]:
                return await self.client.get_manifest(endpoint, self.reference.repository, identifier)

            try:
                resolved = await _resolve_documents(fetch, self.reference.identifier, platform, endpoint.host)
            except (ImageNotFound, RegistryUnavailable) as exc:
                # Like docker: a mirror that lacks the image or is down is skipped.
                if not endpoint.is_mirror:
                    failures.append(exc)
                    break
                failures.append(exc)
                continue
            self.endpoint = endpoint
            return resolved
        # Report "not found" over "unavailable": it is the answer someone actually gave.
        not_found = [f for f in failures if isinstance(f, ImageNotFound)]
        chosen = not_found[0] if not_found else failures[-1]
        raise type(chosen)(f"{self.reference}: {chosen}") from chosen

    @asynccontextmanager
    async def open(self, digest: str, offset: int) -> AsyncIterator[tuple[AsyncIterator[bytes], int]]:
        assert self.endpoint is not None, "resolve() first"
        async with self.client.open_blob(self.endpoint, self.reference.repository, digest, offset) as (response, served):
            yield response.aiter_bytes(), served


async def _file_chunks(path: Path, offset: int) -> AsyncIterator[bytes]:
    async with await anyio.open_file(path, "rb") as file:
        await file.seek(offset)
        while chunk := await file.read(CHUNK):
            yield chunk


class OCILayoutSource:
    """An OCI image layout directory (oci-layout, index.json, blobs/), as skopeo or umoci write it."""

    def __init__(self, directory: Path, tag: str | None = None) -> None:
        self.directory = directory
        self.tag = tag
        self.name = f"oci:{directory}" + (f":{tag}" if tag else "")

    def _blob_path(self, digest: str) -> Path:
        algorithm, _, hex_part = validate_digest(digest).partition(":")
        return self.directory / "blobs" / algorithm / hex_part

    async def _read_document(self, identifier: str) -> tuple[bytes, str, str]:
        path = self.directory / "index.json" if identifier == "index.json" else self._blob_path(identifier)
        try:
            raw = await anyio.Path(path).read_bytes()
        except FileNotFoundError as exc:
            raise ImageNotFound(f"{self.name}: no {identifier}") from exc
        return raw, "", "sha256:" + hashlib.sha256(raw).hexdigest()

    async def resolve(self, platform: Platform) -> ResolvedManifest:
        if not (self.directory / "oci-layout").is_file():
            raise ImageError(f"{self.directory} is not an OCI image layout (no oci-layout file)")
        raw, _, _ = await self._read_document("index.json")
        top = parse_manifest_or_index(raw)
        if not isinstance(top, Index):
            raise ImageError(f"{self.directory}/index.json is not an index")
        entries = list(top.manifests)
        if self.tag:
            entries = [e for e in entries if e.annotations.get(REF_NAME_ANNOTATION) == self.tag]
        if not entries:
            raise ImageNotFound(f"{self.name}: no manifest" + (f" tagged {self.tag!r}" if self.tag else " in index.json"))
        # Several candidates (one per platform, or an untagged multi-image layout): the platform decides.
        entry = entries[0] if len(entries) == 1 else select_platform(Index(top.media_type, tuple(entries)), platform)
        return await _resolve_documents(self._read_document, entry.digest, platform, self.name)

    @asynccontextmanager
    async def open(self, digest: str, offset: int) -> AsyncIterator[tuple[AsyncIterator[bytes], int]]:
        path = self._blob_path(digest)
        if not path.is_file():
            raise ImageNotFound(f"{self.name}: blob {digest} missing")
        yield _file_chunks(path, offset), offset


class DockerArchiveSource:
    """A `docker save` tarball: manifest.json naming a config and uncompressed layer tars.

    The archive has no manifest in registry form, so one is synthesized (OCI,
    uncompressed layers); its digest is stable for a given archive content.
    """

    def __init__(self, path: Path, tag: str | None = None) -> None:
        self.path = path
        self.tag = tag
        self.name = f"docker-archive:{path}" + (f":{tag}" if tag else "")
        self._members: dict[str, str] = {}  # digest -> member name in the tar

    def _describe(self) -> tuple[bytes, dict[str, str]]:
        """Blocking: read manifest.json, hash config and layers, build an OCI manifest."""
        try:
            with tarfile.open(self.path) as archive:
                entries = json.load(_member(archive, "manifest.json"))
                if self.tag:
                    entries = [e for e in entries if any(t.endswith(self.tag) for t in e.get("RepoTags") or ())]
                if not entries:
                    raise ImageNotFound(f"{self.name}: no image{' tagged ' + self.tag if self.tag else ''}")
                entry = entries[0]
                members: dict[str, str] = {}
                config = _hash_member(archive, entry["Config"])
                members[config[0]] = entry["Config"]
                layers = []
                for name in entry["Layers"]:
                    digest, size = _hash_member(archive, name)
                    members[digest] = name
                    layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest, "size": size})
        except (tarfile.TarError, OSError, ValueError, KeyError) as exc:
            raise ImageError(f"{self.name}: not a docker-archive tarball ({exc})") from exc
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": DOCKER_CONFIG, "digest": config[0], "size": config[1]},
            "layers": layers,
        }
        return json.dumps(manifest, sort_keys=True).encode(), members

    async def resolve(self, platform: Platform) -> ResolvedManifest:
        raw, self._members = await anyio.to_thread.run_sync(self._describe)
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        document = parse_manifest_or_index(raw)
        assert isinstance(document, Manifest)
        return ResolvedManifest(digest, raw, document, {digest: raw})

    @asynccontextmanager
    async def open(self, digest: str, offset: int) -> AsyncIterator[tuple[AsyncIterator[bytes], int]]:
        name = self._members[digest]

        async def chunks() -> AsyncIterator[bytes]:
            archive = await anyio.to_thread.run_sync(tarfile.open, self.path)
            try:
                member = await anyio.to_thread.run_sync(_member, archive, name)
                await anyio.to_thread.run_sync(member.seek, offset)
                while chunk := await anyio.to_thread.run_sync(member.read, CHUNK):
                    yield chunk
            finally:
                archive.close()

        yield chunks(), offset


def _member(archive: tarfile.TarFile, name: str) -> IO[bytes]:
    file = archive.extractfile(os.path.normpath(name))
    if file is None:
        raise ImageError(f"{name} is not a file in the archive")
    return file


def _hash_member(archive: tarfile.TarFile, name: str) -> tuple[str, int]:
    hasher, size = hashlib.sha256(), 0
    file = _member(archive, name)
    while block := file.read(CHUNK):
        hasher.update(block)
        size += len(block)
    return "sha256:" + hasher.hexdigest(), size


def local_source(text: str) -> OCILayoutSource | DockerArchiveSource | None:
    """'oci:DIR[:TAG]', 'docker-archive:FILE[:TAG]', or a path (/, ./, ../, ~); None for a registry reference."""
    for prefix, kind in (("oci:", "oci"), ("docker-archive:", "archive")):
        if text.startswith(prefix):
            location, tag = text[len(prefix) :], None
            if ":" in location and not Path(location).exists():
                location, tag = location.rsplit(":", 1)
            path = Path(location).resolve()
            return OCILayoutSource(path, tag) if kind == "oci" else DockerArchiveSource(path, tag)
    # Only what looks like a path: a directory that happens to be called "busybox" is not the image busybox.
    if text.startswith(("/", "./", "../", "~")):
        path = Path(text).expanduser().resolve()
        if path.is_dir():
            return OCILayoutSource(path)
        if path.is_file():
            return DockerArchiveSource(path)
        raise ImageNotFound(f"{text}: no such file or directory")
    return None


__all__ = ["DockerArchiveSource", "ImageSource", "OCILayoutSource", "RegistrySource", "local_source"]
