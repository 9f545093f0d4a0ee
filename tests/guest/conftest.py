"""Fixtures of the guest-kernel tests (helpers: guestboot.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from guestboot import CACHE, artifact


@pytest.fixture(scope="session")
def vmlinux() -> Path:
    return artifact("CELLVM_KERNEL", CACHE / "kernel" / "vmlinux", "guest kernel")


@pytest.fixture(scope="session")
def testinit() -> Path:
    return artifact(
        "CELLVM_TESTINIT", CACHE / "kernel" / "testinit.cpio.gz", "test initramfs"
    )


@pytest.fixture(scope="session")
def qemu() -> str:
    path = shutil.which("qemu-system-x86_64")
    if not path:
        pytest.fail("qemu-system-x86_64 not found (apt package qemu-system-x86)", pytrace=False)
    return path


