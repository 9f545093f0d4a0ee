"""Fixtures shared by every suite."""

from __future__ import annotations

import os

import pytest


def kvm_problem() -> str | None:
    """Why VM tests cannot run here, or None. A missing /dev/kvm skips them;
    a present but unusable one is a failure the tests must show."""
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm is not present on this machine"
    return None


@pytest.fixture
def kvm() -> None:
    """Use in every test that needs a real VM."""
    problem = kvm_problem()
    if problem:
        pytest.skip(problem)
