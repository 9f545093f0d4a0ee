"""files operations through the client, against the agent as a host process."""

from __future__ import annotations

import hashlib
import os
import stat
from contextlib import aclosing
from pathlib import Path

import pytest

from cellvm.agent import AgentClient
from cellvm.errors import GuestFileError, GuestFileNotFound

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


async def test_write_read_round_trip(agent: AgentClient, tmp_path: Path) -> None:
    path = str(tmp_path / "hello.txt")
    assert await agent.files.write(path, b"hello\n") == 6
    assert await agent.files.read(path) == b"hello\n"
    assert (tmp_path / "hello.txt").read_bytes() == b"hello\n"
    assert await agent.files.write(path, b"again\n", append=True) == 6
    assert await agent.files.read(path) == b"hello\nagain\n"
    assert await agent.files.write(path, b"") == 0
    assert await agent.files.read(path) == b""


async def test_large_file_round_trip(agent: AgentClient, tmp_path: Path) -> None:
    data = os.urandom(24 << 20)
    path = str(tmp_path / "large.bin")
    assert await agent.files.write(path, data) == len(data)
    back = await agent.files.read(path)
    assert hashlib.sha256(back).digest() == hashlib.sha256(data).digest()


async def test_write_from_async_iterable(agent: AgentClient, tmp_path: Path) -> None:
    async def pieces():
        for i in range(100):
            yield bytes([i]) * 10_000

    path = str(tmp_path / "pieces.bin")
    assert await agent.files.write(path, pieces()) == 1_000_000
    data = (tmp_path / "pieces.bin").read_bytes()
    assert data[:10_000] == b"\0" * 10_000 and data[-1] == 99


async def test_read_range_and_early_stop(agent: AgentClient, tmp_path: Path) -> None:
    source = tmp_path / "digits"
    source.write_bytes(b"0123456789" * 100_000)
    assert await agent.files.read(str(source), offset=5, length=7) == b"5678901"
    async with aclosing(agent.files.read_chunks(str(source))) as chunks:
        async for chunk in chunks:
            assert chunk.startswith(b"0123")
            break  # the agent's side of the stream is cancelled
    assert await agent.files.read(str(source), length=3) == b"012"


async def test_write_mode(agent: AgentClient, tmp_path: Path) -> None:
    path = tmp_path / "tool.sh"
    await agent.files.write(str(path), b"#!/bin/sh\necho run\n", mode=0o755)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert (await agent.exec(str(path))).stdout == b"run\n"
    await agent.files.write(str(path), b"x", mode=0o600)  # existing file: the mode still applies
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_stat(agent: AgentClient, tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"12345")
    (tmp_path / "link").symlink_to("file")
    info = await agent.files.stat(str(tmp_path / "file"))
    assert (info.name, info.type, info.size, info.uid) == ("file", "file", 5, 0)
    assert info.mtime_ns == (tmp_path / "file").stat().st_mtime_ns
    link = await agent.files.stat(str(tmp_path / "link"))
    assert (link.type, link.target) == ("symlink", "file")
    followed = await agent.files.stat(str(tmp_path / "link"), follow_symlinks=True)
    assert followed.type == "file" and followed.size == 5
    assert (await agent.files.stat(str(tmp_path))).type == "dir"
    assert await agent.files.exists(str(tmp_path / "file"))
    assert not await agent.files.exists(str(tmp_path / "nope"))


async def test_list(agent: AgentClient, tmp_path: Path) -> None:
    directory = tmp_path / "listing"
    directory.mkdir()
    (directory / "b.txt").write_bytes(b"bb")
    (directory / "a-dir").mkdir()
    (directory / "c-link").symlink_to("b.txt")
    entries = await agent.files.list(str(directory))
    assert [(e.name, e.type) for e in entries] == [("a-dir", "dir"), ("b.txt", "file"), ("c-link", "symlink")]
    assert entries[1].size == 2


async def test_list_of_a_large_directory_spans_frames(agent: AgentClient, tmp_path: Path) -> None:
    directory = tmp_path / "many"
    directory.mkdir()
    names = {f"{'n' * 200}-{i:05d}" for i in range(6000)}  # > 1 MiB of entries
    for name in names:
        (directory / name).touch()
    entries = await agent.files.list(str(directory))
    assert {e.name for e in entries} == names


async def test_mkdir_and_remove(agent: AgentClient, tmp_path: Path) -> None:
    deep = tmp_path / "a" / "b" / "c"
    with pytest.raises(GuestFileNotFound):
        await agent.files.mkdir(str(deep))
    await agent.files.mkdir(str(deep), parents=True)
    assert deep.is_dir()
    await agent.files.mkdir(str(deep), parents=True)  # exists: fine with parents
    with pytest.raises(GuestFileError) as info:
        await agent.files.mkdir(str(deep))
    assert info.value.code == "exists"
    (deep / "file").write_bytes(b"x")
    with pytest.raises(GuestFileError) as info:
        await agent.files.remove(str(tmp_path / "a"))
    assert info.value.code == "not-empty"
    await agent.files.remove(str(deep / "file"))
    assert not (deep / "file").exists()
    (deep / "file2").write_bytes(b"x")
    await agent.files.remove(str(tmp_path / "a"), recursive=True)
    assert not (tmp_path / "a").exists()


async def test_missing_paths(agent: AgentClient, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    for operation in (
        agent.files.read(missing),
        agent.files.stat(missing),
        agent.files.list(missing),
        agent.files.remove(missing),
        agent.files.write(str(tmp_path / "no-dir" / "file"), b"data"),
    ):
        with pytest.raises(GuestFileNotFound):
            await operation


async def test_wrong_kinds(agent: AgentClient, tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(GuestFileError) as info:
        await agent.files.read(str(tmp_path))
    assert info.value.code == "is-a-directory"
    with pytest.raises(GuestFileError) as info:
        await agent.files.list(str(tmp_path / "file"))
    assert info.value.code == "not-a-directory"
    with pytest.raises(GuestFileError) as info:
        await agent.files.remove("/", recursive=True)
    assert info.value.code == "invalid"


async def test_abandoned_write_is_cancelled(agent: AgentClient, tmp_path: Path) -> None:
    class SourceBroke(Exception):
        pass

    async def failing_source():
        yield b"first part"
        raise SourceBroke

    path = tmp_path / "partial"
    for _ in range(300):  # more than the agent's 256 stream slots: each one is freed
        with pytest.raises(SourceBroke):
            await agent.files.write(str(path), failing_source())
    await agent.hello()  # frames are handled in order: the CANCELs are done
    assert path.read_bytes() == b"first part"
    assert await agent.files.write(str(path), b"whole") == 5
