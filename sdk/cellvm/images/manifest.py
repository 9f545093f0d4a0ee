"""OCI and Docker v2 schema 2 manifests, indexes and platform selection.

Only the fields cellvm uses are modelled; the raw JSON bytes are kept so a
manifest's digest is always computed over exactly what the registry sent.
"""

from __future__ import annotations

import json
import platform as host_platform
from dataclasses import dataclass, field
from typing import Any

from cellvm.errors import ImageError, ImageNotFound
from cellvm.images.reference import validate_digest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"

MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
# Sent as Accept so registries never fall back to the deprecated schema 1.
ACCEPT = ", ".join(INDEX_TYPES + MANIFEST_TYPES)

LAYER_GZIP = (
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
)
LAYER_ZSTD = (
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
)
LAYER_PLAIN = (
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
)
LAYER_TYPES = LAYER_GZIP + LAYER_ZSTD + LAYER_PLAIN


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Descriptor:
        try:
            platform = Platform.from_json(data["platform"]) if "platform" in data else None
            return cls(
                media_type=str(data.get("mediaType", "")),
                digest=validate_digest(str(data["digest"])),
                size=int(data["size"]),
                platform=platform,
                annotations=dict(data.get("annotations") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ImageError(f"malformed descriptor {data!r}: {exc}") from exc


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        """'linux/amd64' or 'linux/arm64/v8'."""
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ImageError(f"platform {text!r} is not os/arch[/variant]")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Platform:
        return cls(str(data.get("os", "")), str(data.get("architecture", "")), data.get("variant"))

    def matches(self, other: Platform) -> bool:
        return (
            self.os == other.os
            and self.architecture == other.architecture
            and (self.variant is None or other.variant is None or self.variant == other.variant)
        )

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def host_linux_platform() -> Platform:
    """The platform our guests run: Linux on the host's CPU architecture."""
    machine = host_platform.machine().lower()
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(machine, machine)
    return Platform("linux", arch)


@dataclass(frozen=True)
class Manifest:
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True)
class Index:
    media_type: str
    manifests: tuple[Descriptor, ...]


def parse_manifest_or_index(raw: bytes, content_type: str | None = None) -> Manifest | Index:
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ImageError(f"manifest is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ImageError("manifest is not a JSON object")
    media_type = data.get("mediaType") or (content_type or "").split(";")[0].strip()
    if not media_type:
        # OCI allows omitting mediaType; the shape tells which document this is.
        media_type = OCI_INDEX if "manifests" in data else OCI_MANIFEST
    if media_type in INDEX_TYPES:
        return Index(media_type, tuple(Descriptor.from_json(d) for d in data.get("manifests") or ()))
    if media_type in MANIFEST_TYPES:
        if "config" not in data:
            raise ImageError("manifest has no config descriptor")
        layers = tuple(Descriptor.from_json(d) for d in data.get("layers") or ())
        for layer in layers:
            if layer.media_type not in LAYER_TYPES:
                raise ImageError(f"unsupported layer media type {layer.media_type!r} ({layer.digest})")
        return Manifest(media_type, Descriptor.from_json(data["config"]), layers)
    raise ImageError(f"unsupported manifest media type {media_type!r} (schema 1 is not supported)")


def select_platform(index: Index, wanted: Platform) -> Descriptor:
    """The index entry for ``wanted``; attestation entries (platform unknown/unknown) never match."""
    for entry in index.manifests:
        if entry.platform and entry.platform.matches(wanted) and entry.media_type not in INDEX_TYPES:
            return entry
    available = ", ".join(str(e.platform) for e in index.manifests if e.platform) or "none"
    raise ImageNotFound(f"no manifest for platform {wanted} in the index (available: {available})")
