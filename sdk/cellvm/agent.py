"""Client for the cellvm guest agent, over any anyio byte stream.

The agent (guest/agent/, PID 1 of every cellvm VM) serves docs/PROTOCOL.md on
one byte stream: /dev/hvc0 in a VM, a socket in tests. This module is the host
side: run commands, stream their output, move files, tell a restored guest
its new entropy and time.

    async with AgentClient(stream) as agent:
        r = await agent.exec("echo", "hi")               # ExecResult
        async with agent.process("cat", stdin=True) as p:
            await p.stdin.send(b"data"); await p.stdin.close()
            async for chunk in p: ...                    # OutputChunk
            status = await p.wait()                      # ExitStatus
        await agent.files.write("/tmp/x", b"...")

Flow control is credit based in both directions: output is credited back to
the agent as the caller takes it, so a slow reader slows the process, never
our memory; stdin waits for the agent's credit.
"""

from __future__ import annotations

import itertools
import logging
import math
import posixpath
import signal as signals
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

import anyio
import anyio.abc

from .errors import (
    AgentDisconnected,
    AgentError,
    CommandNotFound,
    ExecFailed,
    ExecTimeout,
    GuestFileError,
    GuestFileNotFound,
    ProtocolError,
)
from .protocol import (
    DATA_CHUNK_MAX,
    FILE_TYPES,
    PROTOCOL_VERSION,
    STREAM_WINDOW,
    ErrorCode,
    Field,
    Fields,
    Flag,
    Frame,
    FrameDecoder,
    MsgType,
    decode_credit,
    encode_credit,
    encode_fields,
    encode_frame,
)

__all__ = [
    "AgentClient",
    "AgentFiles",
    "AgentInfo",
    "ExecResult",
    "ExitStatus",
    "FileInfo",
    "OutputChunk",
    "Process",
    "ProcessStdin",
    "RestoreReport",
]

log = logging.getLogger(__name__)

_DATA_TYPES = (MsgType.STDOUT, MsgType.STDERR, MsgType.FILE_DATA)
# How long leaving a process() block waits for a killed process to report.
_KILL_GRACE_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class AgentInfo:
    version: int
    agent: str
    pid: int
    init: bool
    window: int
    max_payload: int


@dataclass(frozen=True, slots=True)
class ExitStatus:
    """How a process ended, as waitpid() reported it.

    ``exit_code`` follows subprocess: the exit status, or -N if signal N
    killed the process (then ``signal`` is N)."""

    exit_code: int
    signal: int | None = None
    timed_out: bool = False
    core_dumped: bool = False


@dataclass(frozen=True, slots=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    signal: int | None = None
    timed_out: bool = False


@dataclass(frozen=True, slots=True)
class OutputChunk:
    stream: Literal["stdout", "stderr"]
    data: bytes


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


@dataclass(frozen=True, slots=True)
class RestoreReport:
    entropy_added: int
    reseeded: bool
    clock_stepped: bool
    clock_offset_ns: int  # host time minus guest time before the step


_ErrorContext = Literal["exec", "file", "other"]


def _error_from(frame: Frame, context: _ErrorContext) -> AgentError:
    fields = Fields(frame.payload)
    code = fields.get_int(Field.CODE, 0) or 0
    errno = fields.get_int(Field.ERRNO, 0) or 0
    message = fields.get_str(Field.MESSAGE) or f"agent error {code}"
    known = code in ErrorCode._value2member_map_
    name = ErrorCode(code).name.lower().replace("_", "-") if known else str(code)
    cls: type[AgentError]
    if code == ErrorCode.PROTOCOL:
        cls = ProtocolError
    elif code == ErrorCode.COMMAND_NOT_FOUND:
        cls = CommandNotFound
    elif context == "exec":
        cls = ExecFailed
    elif context == "file":
        cls = GuestFileNotFound if code == ErrorCode.NOT_FOUND else GuestFileError
    else:
        cls = AgentError
    return cls(message, code=name, errno=errno)


def _unexpected(frame: Frame, waiting_for: str) -> ProtocolError:
    kind = MsgType(frame.type).name if frame.type in MsgType._value2member_map_ else frame.type
    return ProtocolError(f"unexpected {kind} frame on stream {frame.id} while waiting for {waiting_for}")


class _Stream:
    """One stream id: frames from the agent in arrival order, plus our
    sending window on it (topped up by the agent's CREDIT frames)."""

    def __init__(self, id: int) -> None:
        self.id = id
        self._inbox_in, self._inbox = anyio.create_memory_object_stream[Frame](math.inf)
        self.send_window = STREAM_WINDOW
        self.finished = False  # a final frame arrived, or the connection is gone
        self._failure: AgentError | None = None
        self._window_changed = anyio.Event()
        self._uncredited = {t: 0 for t in _DATA_TYPES}

    def deliver(self, frame: Frame) -> None:
        if frame.type in self._uncredited:
            # The agent may only send what we credited: more means the stream
            # accounting is broken and memory would grow without bound.
            self._uncredited[frame.type] += len(frame.payload)
            if self._uncredited[frame.type] > STREAM_WINDOW:
                raise ProtocolError(f"agent overran the window of stream {self.id}")
        elif frame.type in (MsgType.EXIT, MsgType.ERROR) or (
            frame.type == MsgType.RESULT and not frame.flags & Flag.MORE
        ):
            self.finished = True
            self._wake()
        self._inbox_in.send_nowait(frame)

    def credited(self, data_type: int, amount: int) -> None:
        self._uncredited[data_type] -= amount

    def add_window(self, amount: int) -> None:
        self.send_window += amount
        self._wake()

    def fail(self, error: AgentError) -> None:
        self._failure = error
        self.finished = True
        self._wake()
        self._inbox_in.close()

    def _wake(self) -> None:
        self._window_changed.set()
        self._window_changed = anyio.Event()

    async def wait_window(self) -> None:
        """Returns when we may send, or the stream is finished."""
        while self.send_window <= 0 and not self.finished:
            await self._window_changed.wait()

    async def next_frame(self) -> Frame:
        try:
            return await self._inbox.receive()
        except anyio.EndOfStream:
            raise self._failure or AgentDisconnected("the agent connection closed") from None


class AgentClient:
    """The host side of one agent connection. Use as an async context
    manager: it owns a reader task and closes the stream on exit."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self._stream = stream
        self._streams: dict[int, _Stream] = {}
        self._ids = itertools.count(1)
        self._send_lock = anyio.Lock()
        self._closed: AgentError | None = None
        self._ready: anyio.Event | None = None
        self._ready_info: AgentInfo | None = None
        self._task_group: anyio.abc.TaskGroup | None = None
        # Errors the agent reported on stream 0 (frames it could not attribute).
        self.connection_errors: list[AgentError] = []
        self.files = AgentFiles(self)

    async def __aenter__(self) -> AgentClient:
        self._ready = anyio.Event()
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self._read_loop)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task_group is not None
        self._task_group.cancel_scope.cancel()
        await self._task_group.__aexit__(None, None, None)
        with anyio.CancelScope(shield=True):
            await self._stream.aclose()

    # --- connection ---------------------------------------------------------

    async def _read_loop(self) -> None:
        decoder = FrameDecoder()
        reason: AgentError = AgentDisconnected("the agent client was closed")
        try:
            while True:
                try:
                    data = await self._stream.receive()
                except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError, OSError):
                    reason = AgentDisconnected("the agent closed the connection")
                    return
                for frame in decoder.feed(data):
                    self._route(frame)
        except ProtocolError as exc:
            reason = exc
            log.error("agent connection broken: %s", exc)
        except Exception as exc:  # a bug here must fail the waiters, not hang them
            reason = AgentError(f"agent client reader failed: {exc!r}")
            log.exception("agent client reader failed")
        finally:
            self._closed = reason
            for stream in list(self._streams.values()):
                stream.fail(reason)

    def _route(self, frame: Frame) -> None:
        if frame.id == 0:
            self._route_connection_frame(frame)
            return
        stream = self._streams.get(frame.id)
        if stream is None:
            return  # a stream we stopped following (cancelled, or left early)
        if frame.type == MsgType.CREDIT:
            _, amount = decode_credit(frame.payload)
            stream.add_window(amount)
        else:
            stream.deliver(frame)

    def _route_connection_frame(self, frame: Frame) -> None:
        if frame.type == MsgType.READY:
            fields = Fields(frame.payload)
            self._ready_info = AgentInfo(
                version=fields.require_int(Field.VERSION),
                agent=fields.get_str(Field.AGENT),
                pid=fields.require_int(Field.PID),
                init=False,
                window=STREAM_WINDOW,
                max_payload=0,
            )
            assert self._ready is not None
            self._ready.set()
        elif frame.type == MsgType.ERROR:
            error = _error_from(frame, "other")
            log.warning("agent reported a connection-level error: %s", error)
            self.connection_errors.append(error)
            del self.connection_errors[:-100]

    def _open_stream(self) -> _Stream:
        if self._closed is not None:
            raise AgentDisconnected(f"agent connection is closed: {self._closed}")
        stream = _Stream(next(self._ids))
        self._streams[stream.id] = stream
        return stream

    def _close_stream(self, stream: _Stream) -> None:
        self._streams.pop(stream.id, None)

    async def send_frame(self, type: int, id: int, payload: bytes = b"", flags: int = 0) -> None:
        """Sends one frame as is (low level; tests use it for malformed frames)."""
        await self._send_bytes(encode_frame(type, id, payload, flags))

    async def send_raw(self, data: bytes) -> None:
        """Sends bytes as is, framing included (tests use it for bad frames)."""
        await self._send_bytes(data)

    async def _send_bytes(self, data: bytes) -> None:
        if self._closed is not None:
            raise AgentDisconnected(f"agent connection is closed: {self._closed}")
        async with self._send_lock:
            try:
                await self._stream.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                raise AgentDisconnected(f"cannot send to the agent: {exc}") from exc

    async def _credit(self, stream: _Stream, data_type: int, amount: int) -> None:
        stream.credited(data_type, amount)
        try:
            await self.send_frame(MsgType.CREDIT, stream.id, encode_credit(data_type, amount))
        except AgentDisconnected:
            pass  # the stream's next read reports it

    async def request(
        self, type: int, payload: bytes, *, context: _ErrorContext = "other"
    ) -> list[Fields]:
        """One request, all its RESULT frames (several when flagged MORE)."""
        stream = self._open_stream()
        try:
            await self.send_frame(type, stream.id, payload)
            results: list[Fields] = []
            while True:
                frame = await stream.next_frame()
                if frame.type == MsgType.ERROR:
                    raise _error_from(frame, context)
                if frame.type != MsgType.RESULT:
                    raise _unexpected(frame, "RESULT")
                results.append(Fields(frame.payload))
                if not frame.flags & Flag.MORE:
                    return results
        finally:
            self._close_stream(stream)

    # --- agent-wide requests ------------------------------------------------

    async def wait_ready(self) -> AgentInfo:
        """Waits for READY, which a freshly started agent sends once. (A
        restored agent sent it before the snapshot: use hello() there.)"""
        assert self._ready is not None, "use AgentClient as an async context manager"
        await self._ready.wait()
        assert self._ready_info is not None
        return self._ready_info

    async def hello(self) -> AgentInfo:
        (fields,) = await self.request(MsgType.HELLO, encode_fields([(Field.VERSION, PROTOCOL_VERSION)]))
        return AgentInfo(
            version=fields.require_int(Field.VERSION),
            agent=fields.get_str(Field.AGENT),
            pid=fields.require_int(Field.PID),
            init=bool(fields.get_int(Field.INIT, 0)),
            window=fields.get_int(Field.WINDOW, STREAM_WINDOW) or STREAM_WINDOW,
            max_payload=fields.get_int(Field.MAX_PAYLOAD, 0) or 0,
        )

    async def restored(self, entropy: bytes, time_ns: int) -> RestoreReport:
        """Tells the agent its VM was restored: it mixes ``entropy`` into the
        guest RNG and reseeds it, and steps the wall clock to ``time_ns``
        (ns since the epoch), before it serves anything sent after this."""
        payload = encode_fields([(Field.ENTROPY, entropy), (Field.TIME_NS, time_ns)])
        (fields,) = await self.request(MsgType.RESTORED, payload)
        return RestoreReport(
            entropy_added=fields.get_int(Field.ENTROPY_ADDED, 0) or 0,
            reseeded=bool(fields.get_int(Field.RESEEDED, 0)),
            clock_stepped=bool(fields.get_int(Field.CLOCK_STEPPED, 0)),
            clock_offset_ns=fields.get_int(Field.CLOCK_OFFSET_NS, 0) or 0,
        )

    # --- processes ----------------------------------------------------------

    @asynccontextmanager
    async def process(
        self,
        *argv: str,
        env: Mapping[str, str | None] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        uid: int | None = None,
        gid: int | None = None,
        stdin: bool = False,
        pty: bool = False,
        rows: int = 24,
        cols: int = 80,
        timeout: float | None = None,
        clear_env: bool = False,
    ) -> AsyncIterator[Process]:
        """Starts a process and yields it once it runs. ``env`` entries
        override the image's Env (None unsets one). ``user`` is "name",
        "uid", "name:group" or "uid:gid", as docker takes it. ``timeout``
        (seconds) makes the agent kill the process group; the exit status
        then says ``timed_out``. Leaving the block kills a process that is
        still running."""
        if not argv:
            raise ValueError("process() needs a command")
        fields: list[tuple[int, int | bool | bytes | str]] = [(Field.ARGV, arg) for arg in argv]
        for key, value in (env or {}).items():
            fields.append((Field.ENV, key if value is None else f"{key}={value}"))
        optional = {Field.CWD: cwd, Field.USER: user, Field.UID: uid, Field.GID: gid}
        fields += [(tag, value) for tag, value in optional.items() if value is not None]
        fields += [(Field.STDIN, stdin), (Field.PTY, pty), (Field.CLEAR_ENV, clear_env)]
        if pty:
            fields += [(Field.ROWS, rows), (Field.COLS, cols)]
        if timeout is not None:
            fields.append((Field.TIMEOUT_MS, max(1, math.ceil(timeout * 1000))))

        stream = self._open_stream()
        try:
            await self.send_frame(MsgType.EXEC, stream.id, encode_fields(fields))
            try:
                frame = await stream.next_frame()
            except BaseException:
                # Cancelled before STARTED: the process may start anyway.
                with anyio.CancelScope(shield=True):
                    await self._kill_quietly(stream)
                raise
            if frame.type == MsgType.ERROR:
                raise _error_from(frame, "exec")
            if frame.type != MsgType.STARTED:
                raise _unexpected(frame, "STARTED")
            process = Process(self, stream, Fields(frame.payload).require_int(Field.PID), stdin)
            try:
                yield process
            finally:
                with anyio.CancelScope(shield=True):
                    await process._end()
        finally:
            self._close_stream(stream)

    async def _kill_quietly(self, stream: _Stream) -> None:
        payload = encode_fields([(Field.SIGNAL, int(signals.SIGKILL))])
        try:
            await self.send_frame(MsgType.SIGNAL, stream.id, payload)
        except AgentDisconnected:
            pass

    async def exec(
        self,
        *argv: str,
        env: Mapping[str, str | None] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        uid: int | None = None,
        gid: int | None = None,
        stdin: bytes | None = None,
        pty: bool = False,
        timeout: float | None = None,
        clear_env: bool = False,
    ) -> ExecResult:
        """Runs a command to completion and returns its output. A non-zero
        exit is a result, not an error; a timeout raises ExecTimeout with
        the partial result attached."""
        stdout, stderr = bytearray(), bytearray()
        async with self.process(
            *argv, env=env, cwd=cwd, user=user, uid=uid, gid=gid,
            stdin=stdin is not None, pty=pty, timeout=timeout, clear_env=clear_env,
        ) as process:  # fmt: skip
            async with anyio.create_task_group() as tasks:
                if stdin is not None:
                    tasks.start_soon(process.stdin.send_all_and_close, stdin)
                async for chunk in process:
                    (stdout if chunk.stream == "stdout" else stderr).extend(chunk.data)
            status = await process.wait()
        result = ExecResult(status.exit_code, bytes(stdout), bytes(stderr), status.signal, status.timed_out)
        if status.timed_out:
            raise ExecTimeout(f"{argv[0]} ran past its timeout of {timeout} s and was killed", result=result)
        return result


class ProcessStdin:
    """The process's stdin. send() waits for the agent's credit, so a
    process that does not read holds the sender, not the agent's memory."""

    def __init__(self, client: AgentClient, stream: _Stream, enabled: bool) -> None:
        self._client = client
        self._stream = stream
        self._enabled = enabled
        self._closed = False
        self._lock = anyio.Lock()

    async def send(self, data: bytes) -> None:
        """Sends the bytes. If the process has already exited they are
        dropped, as a pipe's reader going away would drop them."""
        if not self._enabled:
            raise ValueError("the process was started without stdin=True")
        if self._closed:
            raise anyio.ClosedResourceError("stdin is closed")
        view = memoryview(data)
        async with self._lock:
            offset = 0
            while offset < len(view):
                await self._stream.wait_window()
                if self._stream.finished:
                    return
                size = min(len(view) - offset, self._stream.send_window, DATA_CHUNK_MAX)
                self._stream.send_window -= size
                await self._client.send_frame(MsgType.STDIN, self._stream.id, bytes(view[offset : offset + size]))
                offset += size

    async def close(self) -> None:
        """Sends EOF (with a pty: the terminal's EOF character, ^D)."""
        if not self._enabled or self._closed:
            return
        self._closed = True
        if not self._stream.finished:
            async with self._lock:
                await self._client.send_frame(MsgType.STDIN, self._stream.id, b"", Flag.EOF)

    async def send_all_and_close(self, data: bytes) -> None:
        await self.send(data)
        await self.close()


class Process:
    """A running process. Iterate it for output chunks; wait() for its exit.

    Output is credited back to the agent as it is taken from the iterator;
    wait() takes (and keeps, for later iteration) whatever is left, so it
    never deadlocks on a full pipe."""

    def __init__(self, client: AgentClient, stream: _Stream, pid: int, stdin: bool) -> None:
        self._client = client
        self._stream = stream
        self.pid = pid
        self.stdin = ProcessStdin(client, stream, stdin)
        self._pending: deque[tuple[OutputChunk, bool]] = deque()  # (chunk, already credited)
        self._status: ExitStatus | None = None
        self._draining = False
        self._pump_lock = anyio.Lock()

    @property
    def status(self) -> ExitStatus | None:
        return self._status

    def __aiter__(self) -> AsyncIterator[OutputChunk]:
        return self

    async def __anext__(self) -> OutputChunk:
        while not self._pending:
            if self._status is not None:
                raise StopAsyncIteration
            await self._pump()
        chunk, credited = self._pending.popleft()
        if not credited:
            await self._client._credit(self._stream, _frame_type(chunk), len(chunk.data))
        return chunk

    async def wait(self) -> ExitStatus:
        self._draining = True
        pending = list(self._pending)
        self._pending = deque((chunk, True) for chunk, _ in pending)
        for chunk, credited in pending:
            if not credited:
                await self._client._credit(self._stream, _frame_type(chunk), len(chunk.data))
        while self._status is None:
            await self._pump()
        return self._status

    async def signal(self, signo: int) -> None:
        """Sends a signal to the process's whole process group."""
        if self._status is None:
            payload = encode_fields([(Field.SIGNAL, int(signo))])
            await self._client.send_frame(MsgType.SIGNAL, self._stream.id, payload)

    async def kill(self) -> None:
        await self.signal(signals.SIGKILL)

    async def resize(self, rows: int, cols: int) -> None:
        """Sets the pty's window size (the process gets SIGWINCH)."""
        if self._status is None:
            payload = encode_fields([(Field.ROWS, rows), (Field.COLS, cols)])
            await self._client.send_frame(MsgType.RESIZE, self._stream.id, payload)

    async def _pump(self) -> None:
        """Takes one frame from the agent; one task at a time."""
        async with self._pump_lock:
            if self._status is not None:
                return
            frame = await self._stream.next_frame()
            if frame.type in (MsgType.STDOUT, MsgType.STDERR):
                name: Literal["stdout", "stderr"] = "stdout" if frame.type == MsgType.STDOUT else "stderr"
                chunk = OutputChunk(name, frame.payload)
                if self._draining:
                    await self._client._credit(self._stream, frame.type, len(frame.payload))
                self._pending.append((chunk, self._draining))
            elif frame.type == MsgType.EXIT:
                fields = Fields(frame.payload)
                signo = fields.get_int(Field.SIGNAL)
                code = fields.get_int(Field.EXIT_CODE)
                self._status = ExitStatus(
                    exit_code=-signo if signo else (code or 0),
                    signal=signo,
                    timed_out=bool(fields.get_int(Field.TIMED_OUT, 0)),
                    core_dumped=bool(fields.get_int(Field.CORE_DUMPED, 0)),
                )
            elif frame.type == MsgType.ERROR:
                raise _error_from(frame, "exec")
            else:
                raise _unexpected(frame, "output or EXIT")

    async def _end(self) -> None:
        """On leaving process(): kill a process still running and collect its
        exit, so the agent forgets it. Bounded: a dead connection ends it."""
        if self._status is not None:
            return
        try:
            await self.stdin.close()
            await self.kill()
            with anyio.move_on_after(_KILL_GRACE_SECONDS):
                await self.wait()
        except AgentError:
            pass


def _frame_type(chunk: OutputChunk) -> int:
    return MsgType.STDOUT if chunk.stream == "stdout" else MsgType.STDERR


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
                    raise _error_from(frame, "file")
                else:
                    raise _unexpected(frame, "FILE_DATA or RESULT")
        finally:
            client._close_stream(stream)
            if not finished and client._closed is None:
                with anyio.CancelScope(shield=True):
                    try:
                        await client.send_frame(MsgType.CANCEL, stream.id)
                    except AgentDisconnected:
                        pass

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
            if frame.type == MsgType.ERROR:
                raise _error_from(frame, "file")
            if frame.type != MsgType.RESULT:
                raise _unexpected(frame, "RESULT")
            return Fields(frame.payload).get_int(Field.SIZE, 0) or 0
        finally:
            client._close_stream(stream)

    async def _send_data(self, stream: _Stream, data: bytes | bytearray | memoryview) -> bool:
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
