"""Real language images and the `cellvm run` command line, end to end."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cellvm.errors import SandboxCrashed
from cellvm.sandbox import Sandbox

pytestmark = pytest.mark.usefixtures("kvm", "mirrored_registry")


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_node_prints_42() -> None:
    async with Sandbox("node:24") as s:
        r = await s.exec("node", "-e", "console.log(40 + 2)")
        assert (r.exit_code, r.stdout) == (0, "42\n"), r.stderr


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_python_runs() -> None:
    async with Sandbox("python:3.11") as s:
        r = await s.exec("python3", "-c", "import sys, json; print(json.dumps(sys.version_info[:2]))")
        assert (r.exit_code, r.stdout) == (0, "[3, 11]\n"), r.stderr


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_guest_panic_gives_sandbox_crashed_with_its_console() -> None:
    async with Sandbox("busybox:latest") as s:
        with pytest.raises(SandboxCrashed) as info:
            await s.exec("sh", "-c", "echo c > /proc/sysrq-trigger")
    assert "Kernel panic" in info.value.console


def cellvm(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    cli = [sys.executable, "-m", "cellvm.cli", *args]
    return subprocess.run(cli, input=stdin, capture_output=True, timeout=120, env=dict(os.environ))


def test_cli_run_passes_streams_and_exit_code() -> None:
    r = cellvm("run", "busybox:latest", "--", "sh", "-c", "cat; echo out; echo err >&2; exit 7", stdin=b"in\n")
    assert (r.returncode, r.stdout, r.stderr) == (7, b"in\nout\n", b"err\n")


def test_cli_run_options() -> None:
    r = cellvm("run", "-e", "A=1", "-w", "/tmp", "-u", "nobody", "--cpus", "2", "--memory", "256m",
               "busybox:latest", "--", "sh", "-c", "echo $A $(pwd) $(id -u) $(nproc)")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"1 /tmp 65534 2\n"


def test_cli_run_unknown_image_is_a_clear_error() -> None:
    r = cellvm("run", "no-such-image:1", "--", "true")
    assert r.returncode == 1
    assert b"ImageNotFound" in r.stderr
