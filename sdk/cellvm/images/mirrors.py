"""Which endpoints serve a registry: its mirrors first, then itself.

Configured by the environment or a TOML file (the environment wins):

    CELLVM_REGISTRY_MIRRORS="http://127.0.0.1:5000"              # mirrors docker.io
    CELLVM_REGISTRY_MIRRORS="docker.io=http://127.0.0.1:5000,ghcr.io=https://m.example"
    CELLVM_REGISTRY_FALLBACK=0     # never fall back from a mirror to the registry itself

    # $CELLVM_REGISTRIES_CONFIG or ~/.config/cellvm/registries.toml
    [registries."docker.io"]
    mirrors = ["http://127.0.0.1:5000"]
    fallback = true

Like docker, a mirror that fails or lacks the image is skipped and the
registry itself is tried last; `fallback = false` turns that off, which is
what a machine without internet (and every test) wants.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from cellvm.errors import ImageError
from cellvm.images.reference import DOCKER_HUB, DOCKER_HUB_API_HOST, Reference


@dataclass(frozen=True)
class Endpoint:
    """One place to ask for a registry's content."""

    base_url: str  # scheme://host[:port], no trailing slash
    is_mirror: bool

    @property
    def host(self) -> str:
        return self.base_url.split("://", 1)[1]


def _is_local(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
    return name in ("localhost", "[::1]") or name.startswith("127.")


def endpoint_for_host(host: str) -> str:
    """Plain http for localhost and 127.0.0.0/8, as docker does; https everywhere else."""
    return f"{'http' if _is_local(host) else 'https'}://{host}"


def _normalize_mirror(url: str) -> str:
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = endpoint_for_host(url)
    if not url.startswith(("http://", "https://")) or url.count("/") > 2:
        raise ImageError(f"registry mirror {url!r} must be scheme://host[:port]")
    return url


@dataclass(frozen=True)
class MirrorConfig:
    mirrors: dict[str, tuple[str, ...]]
    fallback: dict[str, bool]

    def endpoints(self, reference: Reference) -> list[Endpoint]:
        registry = reference.registry
        endpoints = [Endpoint(url, True) for url in self.mirrors.get(registry, ())]
        if not endpoints or self.fallback.get(registry, True):
            host = DOCKER_HUB_API_HOST if registry == DOCKER_HUB else registry
            endpoints.append(Endpoint(endpoint_for_host(host), False))
        return endpoints


def config_file_path() -> Path:
    if os.environ.get("CELLVM_REGISTRIES_CONFIG"):
        return Path(os.environ["CELLVM_REGISTRIES_CONFIG"])
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "cellvm" / "registries.toml"


def load_mirror_config() -> MirrorConfig:
    """Read the config file, then let the environment override it (blocking: a small file read)."""
    mirrors: dict[str, tuple[str, ...]] = {}
    fallback: dict[str, bool] = {}
    path = config_file_path()
    if path.exists():
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ImageError(f"cannot read registry config {path}: {exc}") from exc
        for registry, settings in (data.get("registries") or {}).items():
            mirrors[registry] = tuple(_normalize_mirror(u) for u in settings.get("mirrors", ()))
            if "fallback" in settings:
                fallback[registry] = bool(settings["fallback"])

    env_mirrors = os.environ.get("CELLVM_REGISTRY_MIRRORS", "").strip()
    if env_mirrors:
        from_env: dict[str, list[str]] = {}
        for item in env_mirrors.replace(" ", ",").split(","):
            if not item:
                continue
            registry, sep, url = item.partition("=")
            if not sep:
                registry, url = DOCKER_HUB, item
            from_env.setdefault(registry, []).append(_normalize_mirror(url))
        mirrors.update({k: tuple(v) for k, v in from_env.items()})
    env_fallback = os.environ.get("CELLVM_REGISTRY_FALLBACK", "").strip().lower()
    if env_fallback:
        allowed = env_fallback not in ("0", "false", "no", "off")
        fallback = {registry: allowed for registry in set(mirrors) | set(fallback)}
    return MirrorConfig(mirrors, fallback)
