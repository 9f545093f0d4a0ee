"""exec and process() through the client, against the agent as a host process."""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path

import anyio
import pytest

from cellvm.agent import AgentClient, OutputChunk
from cellvm.errors import CommandNotFound, ExecFailed, ExecTimeout

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


async def test_echo(agent: AgentClient) -> None:
    result = await agent.exec("echo", "hello", "world")
    assert result.exit_code == 0
    assert result.stdout == b"hello world\n"
    assert result.stderr == b""
    assert result.signal is None


async def test_exit_codes_and_stderr(agent: AgentClient) -> None:
    result = await agent.exec("sh", "-c", "echo out; echo err >&2; exit 7")
    assert (result.exit_code, result.stdout, result.stderr) == (7, b"out\n", b"err\n")


async def test_killed_by_signal_is_reported_as_waitpid_does(agent: AgentClient) -> None:
    result = await agent.exec("sh", "-c", "kill -KILL $$")
    assert result.signal == signal.SIGKILL
    assert result.exit_code == -signal.SIGKILL
    assert not result.timed_out


async def test_env_is_merged_and_can_unset(agent: AgentClient) -> None:
    result = await agent.exec("sh", "-c", 'echo "$GREETING|${PATH:+has-path}|$HOME"', env={"GREETING": "hi there"})
    greeting, has_path, home = result.stdout.decode().strip().split("|")
    assert greeting == "hi there"
    assert has_path == "has-path"  # a default PATH when the image has none
    assert home == "/root"  # from /etc/passwd for uid 0
    result = await agent.exec("sh", "-c", 'echo "${HOME-unset}"', env={"HOME": None})
    assert result.stdout == b"/root\n"  # unsetting falls back to the user's home


async def test_cwd(agent: AgentClient, tmp_path: Path) -> None:
    result = await agent.exec("pwd", cwd=str(tmp_path))
    assert result.stdout.decode().strip() == str(tmp_path)


async def test_bad_cwd_is_exec_failed(agent: AgentClient, tmp_path: Path) -> None:
    with pytest.raises(ExecFailed) as info:
        await agent.exec("true", cwd=str(tmp_path / "missing"))
    assert info.value.code == "bad-cwd"


async def test_runs_as_nobody(agent: AgentClient) -> None:
    result = await agent.exec("sh", "-c", "id -u; id -g; echo $HOME", user="nobody")
    uid, gid, _home = result.stdout.decode().split()
    assert uid == "65534"
    assert gid == "65534"
    result = await agent.exec("id", "-u", uid=1234, gid=4321)
    assert result.stdout == b"1234\n"


async def test_unknown_user_is_exec_failed(agent: AgentClient) -> None:
    with pytest.raises(ExecFailed) as info:
        await agent.exec("true", user="no-such-user-here")
    assert info.value.code == "bad-user"


async def test_missing_binary_is_command_not_found(agent: AgentClient) -> None:
    with pytest.raises(CommandNotFound):
        await agent.exec("definitely-not-a-command-cellvm")
    with pytest.raises(CommandNotFound):
        await agent.exec("/nonexistent/bin/tool")
    # PATH is the child's, not the agent's
    with pytest.raises(CommandNotFound):
        await agent.exec("sh", "-c", "true", env={"PATH": "/nonexistent"})


async def test_not_executable_is_permission_denied(agent: AgentClient, tmp_path: Path) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    with pytest.raises(ExecFailed) as info:
        await agent.exec(str(script))
    assert info.value.code == "permission"


async def test_stdin(agent: AgentClient) -> None:
    result = await agent.exec("cat", stdin=b"from the host\n")
    assert result.stdout == b"from the host\n"
    result = await agent.exec("wc", "-c", stdin=b"")
    assert result.stdout.strip() == b"0"


async def test_large_stdin_and_stdout_at_once(agent: AgentClient) -> None:
    data = os.urandom(5 << 20)
    result = await agent.exec("cat", stdin=data)
    assert len(result.stdout) == len(data)
    assert hashlib.sha256(result.stdout).digest() == hashlib.sha256(data).digest()


async def test_10_mib_stdout_arrives_intact(agent: AgentClient, tmp_path: Path) -> None:
    source = tmp_path / "random.bin"
    source.write_bytes(os.urandom(10 << 20))
    result = await agent.exec("cat", str(source))
    assert len(result.stdout) == 10 << 20
    assert hashlib.sha256(result.stdout).hexdigest() == hashlib.sha256(source.read_bytes()).hexdigest()


async def test_output_waits_for_the_reader(agent: AgentClient, tmp_path: Path) -> None:
    """Back-pressure: while nobody reads, the child blocks on a full pipe; it
    cannot finish writing 8 MiB (window, pipe and socket buffers hold far less)."""
    marker = tmp_path / "finished-writing"
    async with agent.process("sh", "-c", f"head -c 8388608 /dev/zero; touch {marker}") as process:
        await anyio.sleep(1)
        assert not marker.exists()
        total = 0
        async for chunk in process:
            total += len(chunk.data)
        status = await process.wait()
    assert total == 8 << 20
    assert status.exit_code == 0
    assert marker.exists()


async def test_stdin_waits_for_the_child(agent: AgentClient) -> None:
    """The agent takes no more stdin than its window while the child does not read."""
    async with agent.process("sleep", "30", stdin=True) as process:
        with anyio.move_on_after(1) as scope:
            await process.stdin.send(b"x" * (8 << 20))
        assert scope.cancelled_caught
        await process.kill()
        status = await process.wait()
    assert status.signal == signal.SIGKILL


async def test_timeout_kills_the_tree_and_agent_stays_usable(agent: AgentClient) -> None:
    # The background sleep holds stdout open: only a group kill ends this.
    with pytest.raises(ExecTimeout) as info:
        await agent.exec("sh", "-c", "echo started; sleep 30 & sleep 30", timeout=0.5)
    assert info.value.result.timed_out
    assert info.value.result.signal == signal.SIGKILL
    assert info.value.result.stdout == b"started\n"
    assert (await agent.exec("echo", "still here")).stdout == b"still here\n"


async def test_long_timeouts_and_bad_values(agent: AgentClient) -> None:
    assert (await agent.exec("true", timeout=30 * 24 * 3600)).exit_code == 0  # a month: fine
    with pytest.raises(ExecFailed) as info:
        await agent.exec("true", timeout=10 * 365 * 24 * 3600)
    assert info.value.code == "invalid"


async def test_twenty_concurrent_execs(agent: AgentClient) -> None:
    results: dict[int, bytes] = {}

    async def run(i: int) -> None:
        result = await agent.exec("sh", "-c", 'sleep 0.2; echo "$0"; echo "e$0" >&2; exit $(($0 % 5))', str(i))
        assert result.exit_code == i % 5
        assert result.stderr == f"e{i}\n".encode()
        results[i] = result.stdout

    async with anyio.create_task_group() as tasks:
        for i in range(20):
            tasks.start_soon(run, i)
    assert results == {i: f"{i}\n".encode() for i in range(20)}


async def test_signal_reaches_the_whole_process_group(agent: AgentClient) -> None:
    async with agent.process("sh", "-c", "echo ready; sleep 30 & sleep 30; wait") as process:
        first = await process.__anext__()
        assert first == OutputChunk("stdout", b"ready\n")
        await process.signal(signal.SIGTERM)
        status = await process.wait()
    assert status.signal == signal.SIGTERM
    assert status.exit_code == -signal.SIGTERM


async def test_process_streams_tagged_chunks(agent: AgentClient) -> None:
    chunks: list[OutputChunk] = []
    async with agent.process("sh", "-c", "echo out; echo err >&2; echo out2") as process:
        async for chunk in process:
            chunks.append(chunk)
        status = await process.wait()
    assert status.exit_code == 0
    assert b"".join(c.data for c in chunks if c.stream == "stdout") == b"out\nout2\n"
    assert b"".join(c.data for c in chunks if c.stream == "stderr") == b"err\n"


async def test_interactive_stdin(agent: AgentClient) -> None:
    async with agent.process("sh", "-c", 'while read line; do echo "got $line"; done', stdin=True) as process:
        await process.stdin.send(b"one\n")
        assert (await process.__anext__()).data == b"got one\n"
        await process.stdin.send(b"two\n")
        assert (await process.__anext__()).data == b"got two\n"
        await process.stdin.close()
        status = await process.wait()
    assert status.exit_code == 0


async def test_wait_without_reading_keeps_the_output(agent: AgentClient) -> None:
    async with agent.process("head", "-c", "1048576", "/dev/zero") as process:
        status = await process.wait()
        received = b"".join([chunk.data async for chunk in process])
    assert status.exit_code == 0
    assert len(received) == 1 << 20


async def test_leaving_process_block_kills_it(agent: AgentClient) -> None:
    async with agent.process("sleep", "30") as process:
        pid = process.pid
    assert process.status is not None and process.status.signal == signal.SIGKILL
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_cancelled_reads_lose_no_output(agent: AgentClient, tmp_path: Path) -> None:
    source = tmp_path / "data.bin"
    source.write_bytes(os.urandom(4 << 20))
    received = bytearray()
    async with agent.process("cat", str(source)) as process:
        while True:
            with anyio.move_on_after(0.002) as scope:
                async for chunk in process:
                    received += chunk.data
            if not scope.cancelled_caught:
                break  # the iteration ran to its end
    assert bytes(received) == source.read_bytes()


async def test_cancelled_sends_keep_the_connection_in_sync(agent: AgentClient) -> None:
    async with agent.process("sh", "-c", "cat > /dev/null; echo done", stdin=True) as process:
        for _ in range(20):
            with anyio.move_on_after(0.005):
                await process.stdin.send(os.urandom(1 << 20))
        await process.stdin.close()
        output = b"".join([chunk.data async for chunk in process])
        assert (await process.wait()).exit_code == 0
    assert output == b"done\n"
    assert (await agent.exec("echo", "in sync")).stdout == b"in sync\n"


async def test_pty(agent: AgentClient) -> None:
    result = await agent.exec(
        "sh", "-c", "test -t 0 && test -t 1 && test -t 2 && echo tty; stty size; echo $TERM", pty=True
    )
    lines = result.stdout.decode().replace("\r", "").split("\n")
    assert lines[:3] == ["tty", "24 80", "xterm"]
    assert result.stderr == b""  # a pty merges stderr into stdout


async def test_pty_window_size_and_resize(agent: AgentClient) -> None:
    async with agent.process("sh", "-c", "stty size; read line; stty size", pty=True, rows=30, cols=100, stdin=True) as process:
        output = b""
        async for chunk in process:
            output += chunk.data
            if b"30 100" in output:
                break
        await process.resize(40, 120)
        await process.stdin.send(b"go\n")
        async for chunk in process:
            output += chunk.data
        status = await process.wait()
    assert status.exit_code == 0
    assert b"40 120" in output


async def test_pty_stdin_eof(agent: AgentClient) -> None:
    async with agent.process("cat", pty=True, stdin=True) as process:
        await process.stdin.send(b"line\n")
        await process.stdin.close()
        output = b"".join([chunk.data async for chunk in process])
        status = await process.wait()
    assert status.exit_code == 0
    assert b"line" in output
