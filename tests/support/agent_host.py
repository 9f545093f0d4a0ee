"""The guest agent as a host process on one end of a socketpair (the agent
tests' fixtures in tests/agent/conftest.py build on this)."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import anyio.abc
import pytest
from anyio.abc import SocketStream


class AgentProcess:
    """The agent running on the host, with its log for failure messages."""

    def __init__(self, process: anyio.abc.Process, log_path: Path) -> None:
        self.process = process
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def stop(self) -> None:
        """Waits for the agent to exit: it does once its connection closes.
        Only a stuck one is killed (by its PID: we started it)."""
        if self.process.returncode is None:
            with anyio.move_on_after(10):
                await self.process.wait()
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
            pytest.fail(f"the agent did not exit when its connection closed\n{self.log()}")
        await self.process.aclose()


async def start_agent(binary: Path, workdir: Path, *extra_args: str) -> tuple[AgentProcess, SocketStream]:
    ours, theirs = socket.socketpair()
    log_path = workdir / "agent.log"
    with theirs, open(log_path, "ab") as log:
        process = await anyio.open_process(
            [str(binary), "--fd", str(theirs.fileno()), *extra_args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            cwd=workdir,
            pass_fds=[theirs.fileno()],
        )
    return AgentProcess(process, log_path), await SocketStream.from_socket(ours)


Launcher = Callable[..., Awaitable[tuple[AgentProcess, SocketStream]]]


