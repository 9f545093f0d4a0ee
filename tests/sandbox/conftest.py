"""Sandbox tests: real VMs restored from templates of real images pulled
from a real local registry (tests/support/registry.py), under asyncio and trio."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # makes `support` importable

from support.registry import Registry, test_images_registry  # noqa: E402

__all__ = ["test_images_registry"]


@pytest.fixture(scope="session")
def mirrored_registry(test_images_registry: Registry) -> Iterator[Registry]:
    """docker.io names (busybox:latest, python:3.11, node:24) resolve to the
    local registry, exactly as a user's mirror setting would make them."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in test_images_registry.mirror_env().items():
            patch.setenv(key, value)
        yield test_images_registry


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param
