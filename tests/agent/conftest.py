"""Fixtures for the agent tests: the agent binary (built by its stage script)
running as a host process on one end of a socketpair, and an AgentClient on
the other end, under asyncio and trio."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketStream

from cellvm.agent import AgentClient

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))  # makes `support` importable

from support.agent_host import AgentProcess, Launcher, start_agent  # noqa: E402

STAGE = REPO / "scripts" / "stages" / "25-agent.sh"


def cache_dir() -> Path:
    return Path(os.environ.get("CELLVM_CACHE", Path.home() / ".cache" / "cellvm"))


@pytest.fixture(scope="session")
def agent_binary() -> Path:
    """Runs the stage script (a no-op when the cached build matches the
    sources), so the tests always exercise the current C code.
    CELLVM_AGENT_BINARY overrides it (e.g. a sanitizer build)."""
    override = os.environ.get("CELLVM_AGENT_BINARY")
    if override:
        return Path(override)
    proc = subprocess.run([str(STAGE)], capture_output=True, text=True, env={**os.environ, "REPO": str(REPO)})
    binary = cache_dir() / "agent" / "cellvm-agent"
    if proc.returncode != 0 or not binary.exists():
        pytest.fail(
            f"building the agent with {STAGE} failed (exit {proc.returncode}); "
            f"no binary at {binary}\n{proc.stderr[-4000:]}"
        )
    return binary


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def agent_workdir(tmp_path: Path) -> Path:
    workdir = tmp_path / "agent"
    workdir.mkdir()
    return workdir


@pytest.fixture
async def launch_agent(agent_binary: Path, agent_workdir: Path) -> AsyncIterator[Launcher]:
    """Starts agents with extra arguments; each is stopped after the test."""
    started: list[tuple[AgentProcess, SocketStream]] = []

    async def launch(*extra_args: str) -> tuple[AgentProcess, SocketStream]:
        started.append(await start_agent(agent_binary, agent_workdir, *extra_args))
        return started[-1]

    yield launch
    for process, stream in started:
        await stream.aclose()
        await process.stop()


@pytest.fixture
async def agent_process(launch_agent: Launcher) -> tuple[AgentProcess, SocketStream]:
    return await launch_agent()


@pytest.fixture
async def agent(agent_process: tuple[AgentProcess, SocketStream]) -> AsyncIterator[AgentClient]:
    """A connected client; the agent's READY has arrived."""
    process, stream = agent_process
    async with AgentClient(stream) as client:
        with anyio.fail_after(10):
            await client.wait_ready()
        yield client
    if process.process.returncode not in (None, 0):
        pytest.fail(f"the agent exited with {process.process.returncode}\n{process.log()}")
