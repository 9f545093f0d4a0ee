"""The protocol itself: handshake, malformed frames, restored, connection end."""

from __future__ import annotations

import os
import time
from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketStream

from cellvm.agent import AgentClient
from cellvm.errors import AgentDisconnected, ProtocolError
from cellvm.protocol import HEADER, MAX_PAYLOAD, PROTOCOL_VERSION, Field, MsgType, encode_fields

from conftest import AgentProcess, Launcher

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


async def test_ready_and_hello(agent: AgentClient, agent_process: tuple[AgentProcess, SocketStream]) -> None:
    ready = await agent.wait_ready()
    info = await agent.hello()
    assert ready.version == info.version == PROTOCOL_VERSION
    assert info.pid == ready.pid == agent_process[0].process.pid
    assert not info.init
    assert info.max_payload == MAX_PAYLOAD
    assert info.agent.startswith("cellvm-agent")


async def test_wrong_version_is_a_protocol_error(agent: AgentClient) -> None:
    with pytest.raises(ProtocolError, match="version"):
        await agent.request(MsgType.HELLO, encode_fields([(Field.VERSION, 99)]))


async def test_restored_is_accepted(agent: AgentClient) -> None:
    entropy = os.urandom(64)
    report = await agent.restored(entropy, time.time_ns())
    assert report.entropy_added == 64
    assert report.reseeded
    assert not report.clock_stepped  # host-process mode never sets the host's clock
    assert abs(report.clock_offset_ns) < 3600 * 10**9
    assert (await agent.exec("echo", "after restore")).exit_code == 0


async def test_restored_rejects_bad_fields(agent: AgentClient) -> None:
    with pytest.raises(ProtocolError):
        await agent.restored(b"x" * 5000, time.time_ns())  # more entropy than allowed
    with pytest.raises(ProtocolError):
        await agent.request(MsgType.RESTORED, encode_fields([(Field.ENTROPY, b"abc")]))  # no time


async def test_malformed_payloads_give_protocol_errors(agent: AgentClient) -> None:
    bad_requests = [
        (MsgType.EXEC, b"\x01\x02\x03"),  # truncated field header
        (MsgType.EXEC, encode_fields([(Field.ARGV, "echo")])[:-2]),  # field runs past the payload
        (MsgType.EXEC, encode_fields([(Field.ARGV, b"ec\0ho")])),  # NUL inside a string
        (MsgType.EXEC, encode_fields([(Field.ARGV, "echo"), (Field.TIMEOUT_MS, b"\x01")])),  # short int
        (MsgType.STAT, b""),  # no path
        (999, b""),  # unknown type
    ]
    for type, payload in bad_requests:
        with pytest.raises(ProtocolError):
            await agent.request(type, payload)
    assert (await agent.exec("echo", "fine")).stdout == b"fine\n"


async def test_oversized_frame_is_skipped(agent: AgentClient) -> None:
    payload_len = MAX_PAYLOAD + 10
    await agent.send_raw(HEADER.pack(payload_len, 0, MsgType.HELLO, 0) + b"\xaa" * payload_len)
    await agent.send_frame(MsgType.HELLO, 0, encode_fields([(Field.VERSION, 1)]), flags=0x80)
    await agent.hello()  # frames are answered in order: both errors are in by now
    messages = [str(error) for error in agent.connection_errors]
    assert any("exceeds the maximum" in m for m in messages), messages
    assert any("unknown flags" in m for m in messages), messages
    assert all(isinstance(error, ProtocolError) for error in agent.connection_errors)
    assert (await agent.exec("echo", "fine")).stdout == b"fine\n"


async def test_closing_the_connection_ends_the_agent_and_its_processes(launch_agent: Launcher) -> None:
    process, stream = await launch_agent()
    pids: list[int] = []
    async with AgentClient(stream) as client:
        async with anyio.create_task_group() as tasks:
            started = anyio.Event()

            async def run_sleep() -> None:
                with pytest.raises(AgentDisconnected):
                    async with client.process("sleep", "30") as p:
                        pids.append(p.pid)
                        started.set()
                        await p.wait()

            tasks.start_soon(run_sleep)
            await started.wait()
            await stream.aclose()  # the host side goes away mid-process
    await process.stop()
    assert process.process.returncode == 0
    with anyio.fail_after(10):
        while _alive(pids[0]):
            await anyio.sleep(0.05)


async def test_orphans_are_reaped(agent: AgentClient, agent_process: tuple[AgentProcess, SocketStream]) -> None:
    """The agent is PID 1 in a VM (a child subreaper on the host): a
    double-forked orphan comes back to it and must not stay a zombie."""
    agent_pid = agent_process[0].process.pid
    result = await agent.exec("sh", "-c", "(sleep 0.2 </dev/null >/dev/null 2>&1 &); echo $$")
    assert result.exit_code == 0
    with anyio.fail_after(10):
        while _children(agent_pid):
            await anyio.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _children(pid: int) -> list[str]:
    children: list[str] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += (task / "children").read_text().split()
    return children
