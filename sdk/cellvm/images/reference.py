"""Image references parsed the way docker parses them.

    node:24                       -> docker.io/library/node:24
    ghcr.io/owner/repo            -> ghcr.io/owner/repo:latest
    127.0.0.1:5000/repo:tag       -> plain-http registry on localhost
    repo@sha256:<64 hex>          -> pinned by digest
    repo:tag@sha256:<64 hex>      -> tag kept for display, digest wins

The grammar follows distribution/reference: the first path component is a
registry host only when it contains "." or ":" or is "localhost".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cellvm.errors import InvalidReference

DOCKER_HUB = "docker.io"
# The host that actually serves Docker Hub's API; "docker.io" is only a name.
DOCKER_HUB_API_HOST = "registry-1.docker.io"

_PATH_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}$")
_SHA256_HEX = re.compile(r"^[a-f0-9]{64}$")
_HOST = re.compile(
    r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"|\[[a-fA-F0-9:]+\])(?::[0-9]+)?$"
)


@dataclass(frozen=True)
class Reference:
    """A fully qualified image reference."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """registry/repository, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def identifier(self) -> str:
        """What to ask the registry's manifest endpoint for: the digest if pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text

    @property
    def familiar(self) -> str:
        """The short form a person types: node:24 rather than docker.io/library/node:24."""
        name = self.name
        if self.registry == DOCKER_HUB:
            name = self.repository.removeprefix("library/")
        text = name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse_reference(text: str) -> Reference:
    """Parse ``text`` like ``docker pull`` does; raise InvalidReference if it does not parse."""
    if not text or text != text.strip() or len(text) > 4096:
        raise InvalidReference(f"invalid image reference {text!r}")
    remainder, digest = text, None
    if "@" in remainder:
        remainder, digest = remainder.split("@", 1)
        validate_digest(digest, what=f"reference {text!r}")
    tag = None
    # A ":" after the last "/" separates the tag; one before it is a registry port.
    last_slash = remainder.rfind("/")
    colon = remainder.rfind(":")
    if colon > last_slash:
        remainder, tag = remainder[:colon], remainder[colon + 1 :]
        if not _TAG.match(tag):
            raise InvalidReference(f"invalid tag {tag!r} in {text!r}")
    if not remainder:
        raise InvalidReference(f"invalid image reference {text!r}: no repository")

    first, _, rest = remainder.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, rest
        if not _HOST.match(registry):
            raise InvalidReference(f"invalid registry host {registry!r} in {text!r}")
    else:
        registry, path = DOCKER_HUB, remainder
    if registry in ("index.docker.io", "registry-1.docker.io"):
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    for component in path.split("/"):
        if not _PATH_COMPONENT.match(component):
            raise InvalidReference(
                f"invalid repository name {path!r} in {text!r}"
                " (lower-case letters, digits and separators . _ __ - only)"
            )
    if len(path) > 255:
        raise InvalidReference(f"repository name too long in {text!r}")
    if tag is None and digest is None:
        tag = "latest"
    return Reference(registry=registry, repository=path, tag=tag, digest=digest)


def validate_digest(digest: str, *, what: str = "digest") -> str:
    """Accept only digests we can verify (sha256), so nothing unverified reaches the cache."""
    if not _DIGEST.match(digest):
        raise InvalidReference(f"invalid digest {digest!r} in {what}")
    algorithm, _, hex_part = digest.partition(":")
    if algorithm != "sha256" or not _SHA256_HEX.match(hex_part):
        raise InvalidReference(f"unsupported digest {digest!r} in {what} (only sha256 is accepted)")
    return digest
