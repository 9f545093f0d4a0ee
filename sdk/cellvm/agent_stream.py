"""One stream id of an agent connection, and how agent errors become exceptions."""

from __future__ import annotations

import math
from typing import Literal

import anyio

from .errors import (
    AgentDisconnected,
    AgentError,
    CellvmError,
    CommandNotFound,
    ExecFailed,
    GuestFileError,
    GuestFileNotFound,
    ProtocolError,
)
from .protocol import STREAM_WINDOW, ErrorCode, Field, Fields, Flag, Frame, MsgType

_DATA_TYPES = (MsgType.STDOUT, MsgType.STDERR, MsgType.FILE_DATA)

ErrorContext = Literal["exec", "file", "other"]


def error_from(frame: Frame, context: ErrorContext) -> AgentError:
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


def unexpected(frame: Frame, waiting_for: str) -> ProtocolError:
    kind = MsgType(frame.type).name if frame.type in MsgType._value2member_map_ else frame.type
    return ProtocolError(f"unexpected {kind} frame on stream {frame.id} while waiting for {waiting_for}")


class Stream:
    """One stream id: frames from the agent in arrival order, plus our
    sending window on it (topped up by the agent's CREDIT frames)."""

    def __init__(self, id: int) -> None:
        self.id = id
        self._inbox_in, self._inbox = anyio.create_memory_object_stream[Frame](math.inf)
        self.send_window = STREAM_WINDOW
        self.finished = False  # a final frame arrived, or the connection is gone
        self._failure: CellvmError | None = None
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

    def fail(self, error: CellvmError) -> None:
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
