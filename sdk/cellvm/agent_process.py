"""Processes started through the agent: output chunks, stdin, exit status."""

from __future__ import annotations

import signal as signals
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import anyio

from .errors import AgentError
from .protocol import DATA_CHUNK_MAX, Field, Fields, Flag, MsgType, encode_fields
from .agent_stream import Stream, error_from, unexpected

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from .agent import AgentClient

# How long leaving a process() block waits for a killed process to report.
KILL_GRACE_SECONDS = 10.0


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


class ProcessStdin:
    """The process's stdin. send() waits for the agent's credit, so a
    process that does not read holds the sender, not the agent's memory."""

    def __init__(self, client: AgentClient, stream: Stream, enabled: bool) -> None:
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

    def __init__(self, client: AgentClient, stream: Stream, pid: int, stdin: bool) -> None:
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
                draining = self._draining
                self._pending.append((OutputChunk(name, frame.payload), draining))
                if draining:
                    await self._client._credit(self._stream, frame.type, len(frame.payload))
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
                raise error_from(frame, "exec")
            else:
                raise unexpected(frame, "output or EXIT")

    async def _end(self) -> None:
        """On leaving process(): kill a process still running and collect its
        exit, so the agent forgets it. Bounded: a dead connection ends it."""
        if self._status is not None:
            return
        try:
            await self.stdin.close()
            await self.kill()
            with anyio.move_on_after(KILL_GRACE_SECONDS):
                await self.wait()
        except AgentError:
            pass


def _frame_type(chunk: OutputChunk) -> int:
    return MsgType.STDOUT if chunk.stream == "stdout" else MsgType.STDERR
