"""File operations in the guest through the agent."""

from __future__ import annotations

import posixpath
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

from .errors import AgentDisconnected, GuestFileNotFound
from .protocol import DATA_CHUNK_MAX, FILE_TYPES, Field, Fields, Flag, MsgType, encode_fields
from .agent_stream import Stream, error_from, unexpected

if TYPE_CHECKING:
    from .agent import AgentClient


@dataclass(frozen=True, slots=True)
class FileInfo:
    name: str
    type: str  # file, dir, symlink, char, block, fifo, socket
    size: int
    mode: int  # permission bits (07777)
    mtime_ns: int
    uid: int | None = None  # stat() only
    gid: int | None = None
    target: str | None = None  # symlinks, stat() only


class AgentFiles:
    """File operations in the guest, run as the agent's user (root).
    Relative paths are taken from the image's working directory."""

    def __init__(self, client: AgentClient) -> None:
        self._client = client

    async def read(self, path: str, *, offset: int = 0, length: int | None = None) -> bytes:
        out = bytearray()
        async for chunk in self.read_chunks(path, offset=offset, length=length):
            out += chunk
        return bytes(out)

    async def read_chunks(self, path: str, *, offset: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
        """Streams a file. Stopping early (use contextlib.aclosing) cancels
        the agent's side of the stream."""
        client = self._client
        stream = client._open_stream()
        fields: list[tuple[int, int | str]] = [(Field.PATH, path), (Field.OFFSET, offset)]
        if length is not None:
            fields.append((Field.LENGTH, length))
        finished = False
        try:
            await client.send_frame(MsgType.FILE_READ, stream.id, encode_fields(fields))
            while True:
                frame = await stream.next_frame()
                if frame.type == MsgType.FILE_DATA:
                    await client._credit(stream, MsgType.FILE_DATA, len(frame.payload))
                    yield frame.payload
                elif frame.type == MsgType.RESULT:
                    finished = True
                    return
                elif frame.type == MsgType.ERROR:
                    finished = True
                    raise error_from(frame, "file")
                else:
                    raise unexpected(frame, "FILE_DATA or RESULT")
        finally:
            client._close_stream(stream)
            if not finished:
                await _cancel(client, stream)

    async def write(
        self,
        path: str,
        data: bytes | AsyncIterable[bytes],
        *,
        mode: int | None = None,
        append: bool = False,
    ) -> int:
        """Writes (or appends to) a file from bytes or an async iterable of
        bytes; returns the size written. ``mode`` is applied explicitly (not
        filtered by a umask); without it a new file gets 0644."""
        client = self._client
        stream = client._open_stream()
        fields: list[tuple[int, int | bool | str]] = [(Field.PATH, path), (Field.APPEND, append)]
        if mode is not None:
            fields.append((Field.MODE, mode))
        answered = False
        try:
            await client.send_frame(MsgType.FILE_WRITE, stream.id, encode_fields(fields))
            if isinstance(data, bytes | bytearray | memoryview):
                await self._send_data(stream, data)
            else:
                async for piece in data:
                    if not await self._send_data(stream, piece):
                        break
            if not stream.finished:
                await client.send_frame(MsgType.FILE_DATA, stream.id, b"", Flag.EOF)
            frame = await stream.next_frame()
            answered = True
            if frame.type == MsgType.ERROR:
                raise error_from(frame, "file")
            if frame.type != MsgType.RESULT:
                raise unexpected(frame, "RESULT")
            return Fields(frame.payload).get_int(Field.SIZE, 0) or 0
        finally:
            client._close_stream(stream)
            if not answered:  # cancelled, or the data source failed: the agent closes the file
                await _cancel(client, stream)

    async def _send_data(self, stream: Stream, data: bytes | bytearray | memoryview) -> bool:
        """Sends within the agent's window; False once the agent has ended
        the stream (its ERROR is then waiting in the inbox)."""
        view = memoryview(data)
        offset = 0
        while offset < len(view):
            await stream.wait_window()
            if stream.finished:
                return False
            size = min(len(view) - offset, stream.send_window, DATA_CHUNK_MAX)
            stream.send_window -= size
            await self._client.send_frame(MsgType.FILE_DATA, stream.id, bytes(view[offset : offset + size]))
            offset += size
        return not stream.finished

    async def list(self, path: str) -> list[FileInfo]:
        """The entries of a directory (without . and ..), sorted by name."""
        results = await self._client.request(MsgType.LIST, encode_fields([(Field.PATH, path)]), context="file")
        entries = [_file_info(Fields(raw)) for fields in results for raw in fields.all(Field.ENTRY)]
        return sorted(entries, key=lambda entry: entry.name)

    async def stat(self, path: str, *, follow_symlinks: bool = False) -> FileInfo:
        payload = encode_fields([(Field.PATH, path), (Field.FOLLOW, follow_symlinks)])
        (fields,) = await self._client.request(MsgType.STAT, payload, context="file")
        return _file_info(fields, name=posixpath.basename(path.rstrip("/")) or "/")

    async def exists(self, path: str) -> bool:
        try:
            await self.stat(path)
        except GuestFileNotFound:
            return False
        return True

    async def mkdir(self, path: str, *, parents: bool = False, mode: int = 0o755) -> None:
        payload = encode_fields([(Field.PATH, path), (Field.PARENTS, parents), (Field.MODE, mode)])
        await self._client.request(MsgType.MKDIR, payload, context="file")

    async def remove(self, path: str, *, recursive: bool = False) -> None:
        payload = encode_fields([(Field.PATH, path), (Field.RECURSIVE, recursive)])
        await self._client.request(MsgType.REMOVE, payload, context="file")


def _file_info(fields: Fields, name: str | None = None) -> FileInfo:
    target = fields.get_str(Field.TARGET) if fields.has(Field.TARGET) else None
    return FileInfo(
        name=name if name is not None else fields.get_str(Field.NAME),
        type=FILE_TYPES.get(fields.get_int(Field.TYPE, 0) or 0, "unknown"),
        size=fields.get_int(Field.SIZE, 0) or 0,
        mode=fields.get_int(Field.MODE, 0) or 0,
        mtime_ns=fields.get_int(Field.MTIME_NS, 0) or 0,
        uid=fields.get_int(Field.UID),
        gid=fields.get_int(Field.GID),
        target=target,
    )


async def _cancel(client: AgentClient, stream: Stream) -> None:
    """Tells the agent to drop a file stream we no longer follow."""
    if client._closed is not None:
        return
    with anyio.CancelScope(shield=True):
        try:
            await client.send_frame(MsgType.CANCEL, stream.id)
        except AgentDisconnected:
            pass
