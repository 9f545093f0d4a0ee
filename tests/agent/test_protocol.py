"""The protocol itself: handshake, malformed frames, restored, connection end."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketStream

from cellvm.agent import AgentClient
from cellvm.errors import AgentDisconnected, CellvmError, ProtocolError
from cellvm.protocol import HEADER, MAX_PAYLOAD, PROTOCOL_VERSION, Field, MsgType, encode_fields

from support.agent_host import AgentProcess, Launcher

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


async def test_random_frames_do_not_hurt_the_agent(agent: AgentClient) -> None:
    """Seeded junk: random headers' types, flags and ids, payloads of random
    bytes or of plausible fields with random values. Only frame types that
    cannot change anything on the host are used (no EXEC, writes, removes)."""
    rng = random.Random(1234)
    harmless = [MsgType.HELLO, MsgType.SIGNAL, MsgType.RESIZE, MsgType.CANCEL, MsgType.STDIN,
                MsgType.FILE_DATA, MsgType.CREDIT, MsgType.STAT, MsgType.LIST, MsgType.FILE_READ,
                MsgType.READY, MsgType.RESULT, MsgType.EXIT, 0, 7, 15, 37, 300, 0xFFFF]  # fmt: skip
    tags = list(Field)

    def random_payload() -> bytes:
        if rng.random() < 0.3:
            return rng.randbytes(rng.randrange(0, 64))
        fields = []
        for _ in range(rng.randrange(0, 6)):
            tag = rng.choice(tags)
            value = rng.choice([rng.randrange(-(2**63), 2**63), rng.randbytes(rng.randrange(0, 20)), "/proc/self/status"])
            fields.append((tag, value))
        encoded = encode_fields(fields)
        return encoded[: rng.randrange(0, len(encoded) + 1)] if rng.random() < 0.2 else encoded

    frames = bytearray()
    for _ in range(3000):
        # ids far above the client's own, so no reply lands on a real request
        frame_id = rng.choice([0, rng.randrange(1_000_000, 1_000_100)])
        flags = rng.choice([0, 0, 1, 2, 3, rng.randrange(0, 0x10000)])
        payload = random_payload()
        frames += HEADER.pack(len(payload), frame_id, rng.choice(harmless), flags) + payload
    await agent.send_raw(bytes(frames))
    info = await agent.hello()
    assert info.version == PROTOCOL_VERSION
    assert (await agent.exec("echo", "still fine")).stdout == b"still fine\n"


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


@pytest.mark.parametrize("stdin", [None, b"input"])
async def test_an_agent_that_dies_fails_its_requests(launch_agent: Launcher, stdin: bytes | None) -> None:
    process, stream = await launch_agent()
    async with AgentClient(stream) as client:
        await client.wait_ready()
        async with anyio.create_task_group() as tasks:

            async def killer() -> None:
                await anyio.sleep(0.2)
                process.process.kill()  # the agent we started, by its PID

            tasks.start_soon(killer)
            with pytest.raises(AgentDisconnected):
                await client.exec("sleep", "30", stdin=stdin)
        with pytest.raises(AgentDisconnected):
            await client.hello()


async def test_abort_fails_open_and_later_requests(agent: AgentClient) -> None:
    class MachineGone(CellvmError):
        pass

    async with anyio.create_task_group() as tasks:

        async def run() -> None:
            with pytest.raises(MachineGone):
                await agent.exec("sleep", "30")

        tasks.start_soon(run)
        await anyio.sleep(0.2)
        await agent.abort(MachineGone("the VM stopped"))
    with pytest.raises(MachineGone):
        await agent.exec("true")


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
