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

Modules: this one holds the connection (reader task, requests, exec);
agent_process.py the Process and its stdin, agent_files.py the file
operations, agent_stream.py the per-stream plumbing and error mapping.
"""

from __future__ import annotations

import itertools
import logging
import math
import signal as signals
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import anyio.abc

from .agent_files import AgentFiles, FileInfo
from .agent_process import ExecResult, ExitStatus, OutputChunk, Process, ProcessStdin
from .agent_stream import ErrorContext, Stream, error_from, unexpected
from .errors import AgentDisconnected, AgentError, CellvmError, ExecTimeout, ProtocolError
from .protocol import (
    PROTOCOL_VERSION,
    STREAM_WINDOW,
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

# A frame the agent does not take within this long means it is gone.
SEND_STALL_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class AgentInfo:
    version: int
    agent: str
    pid: int
    init: bool
    window: int
    max_payload: int


@dataclass(frozen=True, slots=True)
class RestoreReport:
    entropy_added: int
    reseeded: bool
    clock_stepped: bool
    clock_offset_ns: int  # host time minus guest time before the step


class AgentClient:
    """The host side of one agent connection. Use as an async context
    manager: it owns a reader task and closes the stream on exit."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self._stream = stream
        self._streams: dict[int, Stream] = {}
        self._ids = itertools.count(1)
        self._send_lock = anyio.Lock()
        self._closed: CellvmError | None = None
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
        reason: CellvmError = AgentDisconnected("the agent client was closed")
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
            if self._closed is None:
                self._closed = reason
            for stream in list(self._streams.values()):
                stream.fail(self._closed)

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
            error = error_from(frame, "other")
            log.warning("agent reported a connection-level error: %s", error)
            self.connection_errors.append(error)
            del self.connection_errors[:-100]

    def _open_stream(self) -> Stream:
        if self._closed is not None:
            raise self._closed
        stream = Stream(next(self._ids))
        self._streams[stream.id] = stream
        return stream

    def _close_stream(self, stream: Stream) -> None:
        self._streams.pop(stream.id, None)

    async def send_frame(self, type: int, id: int, payload: bytes = b"", flags: int = 0) -> None:
        """Sends one frame as is (low level; tests use it for malformed frames)."""
        await self._send_bytes(encode_frame(type, id, payload, flags))

    async def send_raw(self, data: bytes) -> None:
        """Sends bytes as is, framing included (tests use it for bad frames)."""
        await self._send_bytes(data)

    async def _send_bytes(self, data: bytes) -> None:
        if self._closed is not None:
            raise self._closed
        async with self._send_lock:
            # A frame goes out whole or the stream is out of sync for good, so
            # a cancellation must not stop it halfway: the send is shielded,
            # and one that stalls (an agent that stopped reading) breaks the
            # connection instead of hanging its caller.
            with anyio.CancelScope(shield=True):
                error: AgentError | None = None
                with anyio.move_on_after(SEND_STALL_SECONDS) as stall:
                    try:
                        await self._stream.send(data)
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                        error = AgentDisconnected(f"cannot send to the agent: {exc}")
                if stall.cancelled_caught:
                    error = AgentDisconnected(f"the agent took no input for {SEND_STALL_SECONDS} s")
                if error is not None:
                    await self._break(error)
                    raise error

    async def abort(self, reason: CellvmError) -> None:
        """Ends the connection from outside, e.g. when the VM behind it
        stopped but its channel stays open: every open and later request
        fails with ``reason``."""
        await self._break(reason)

    async def _break(self, reason: CellvmError) -> None:
        """Ends the connection: every open request fails with ``reason``."""
        if self._closed is None:
            self._closed = reason
        for stream in list(self._streams.values()):
            stream.fail(reason)
        await self._stream.aclose()

    async def _credit(self, stream: Stream, data_type: int, amount: int) -> None:
        """Returns window for data the caller has taken. Shielded: a credit
        lost to a cancellation would shrink the agent's window for good."""
        stream.credited(data_type, amount)
        with anyio.CancelScope(shield=True):
            try:
                await self.send_frame(MsgType.CREDIT, stream.id, encode_credit(data_type, amount))
            except AgentDisconnected:
                pass  # the stream's next read reports it

    async def request(
        self, type: int, payload: bytes, *, context: ErrorContext = "other"
    ) -> list[Fields]:
        """One request, all its RESULT frames (several when flagged MORE)."""
        stream = self._open_stream()
        try:
            await self.send_frame(type, stream.id, payload)
            results: list[Fields] = []
            while True:
                frame = await stream.next_frame()
                if frame.type == MsgType.ERROR:
                    raise error_from(frame, context)
                if frame.type != MsgType.RESULT:
                    raise unexpected(frame, "RESULT")
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
                raise error_from(frame, "exec")
            if frame.type != MsgType.STARTED:
                raise unexpected(frame, "STARTED")
            process = Process(self, stream, Fields(frame.payload).require_int(Field.PID), stdin)
            try:
                yield process
            finally:
                with anyio.CancelScope(shield=True):
                    await process._end()
        finally:
            self._close_stream(stream)

    async def _kill_quietly(self, stream: Stream) -> None:
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
            if stdin is None:
                await _collect(process, stdout, stderr)
            else:
                try:
                    async with anyio.create_task_group() as tasks:
                        tasks.start_soon(process.stdin.send_all_and_close, stdin)
                        await _collect(process, stdout, stderr)
                except BaseExceptionGroup as group:
                    # Callers catch CommandNotFound, AgentDisconnected, ...,
                    # not groups: both tasks fail the same way when the
                    # connection goes, so the first error says it all.
                    raise _first_cellvm_error(group) from None
            status = await process.wait()
        result = ExecResult(status.exit_code, bytes(stdout), bytes(stderr), status.signal, status.timed_out)
        if status.timed_out:
            raise ExecTimeout(f"{argv[0]} ran past its timeout of {timeout} s and was killed", result=result)
        return result


async def _collect(process: Process, stdout: bytearray, stderr: bytearray) -> None:
    async for chunk in process:
        (stdout if chunk.stream == "stdout" else stderr).extend(chunk.data)


def _first_cellvm_error(group: BaseExceptionGroup) -> BaseException:
    """The first CellvmError in a task group's exceptions, else the group."""
    for error in group.exceptions:
        if isinstance(error, BaseExceptionGroup):
            error = _first_cellvm_error(error)
        if isinstance(error, CellvmError):
            return error
    return group
