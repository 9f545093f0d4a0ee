"""Fixtures for the image tests: a registry holding the test images, an empty cache."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # makes `support` importable

from imagehelpers import isolate_config  # noqa: E402
from support.registry import Registry, test_images_dir, test_images_registry  # noqa: E402

from cellvm.images import ImageStore  # noqa: E402

__all__ = ["test_images_registry"]


@pytest.fixture(scope="session")
def images_dir() -> Path:
    try:
        return test_images_dir()
    except RuntimeError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def registry(images_dir: Path, test_images_registry: Registry) -> Registry:
    return test_images_registry


@pytest.fixture
def mirror_env(registry: Registry, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Registry:
    """docker.io names resolve to the session registry only; no user config leaks in."""
    isolate_config(monkeypatch, tmp_path)
    for key, value in registry.mirror_env().items():
        monkeypatch.setenv(key, value)
    return registry


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "cache" / "images")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
