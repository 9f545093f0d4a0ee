"""The cellvm agent protocol on the wire: frames and control-message fields.

docs/PROTOCOL.md is the reference and guest/agent/proto.h the C side; the
numbers here must match both. This module only encodes and decodes bytes; it
does no I/O (see :mod:`cellvm.agent` for the client).

A frame is a 12-byte little-endian header (u32 payload length, u32 stream id,
u16 type, u16 flags) and its payload. Data frames carry raw bytes; control
frames carry fields: u16 tag, u32 length, value (integers as 8-byte signed
little endian, strings as raw bytes; a tag may repeat).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import ProtocolError

PROTOCOL_VERSION = 1

HEADER = struct.Struct("<IIHH")
MAX_PAYLOAD = 1 << 20
# Data frames carry at most DATA_CHUNK_MAX bytes; every data channel starts
# with STREAM_WINDOW bytes of credit that the receiver tops up with CREDIT.
DATA_CHUNK_MAX = 64 << 10
STREAM_WINDOW = 256 << 10

_FIELD_HEADER = struct.Struct("<HI")
_INT = struct.Struct("<q")
_CREDIT = struct.Struct("<HHI")


class MsgType(enum.IntEnum):
    # host -> agent requests
    HELLO = 1
    EXEC = 2
    SIGNAL = 3
    RESIZE = 4
    RESTORED = 5
    CANCEL = 6
    FILE_READ = 16
    FILE_WRITE = 17
    LIST = 18
    STAT = 19
    MKDIR = 20
    REMOVE = 21
    # data and flow control
    STDIN = 32
    STDOUT = 33
    STDERR = 34
    FILE_DATA = 35
    CREDIT = 36
    # agent -> host
    READY = 64
    RESULT = 65
    ERROR = 66
    STARTED = 67
    EXIT = 68


class Flag(enum.IntFlag):
    EOF = 1  # data frame: the last of its channel
    MORE = 2  # RESULT: more RESULT frames of this request follow


class Field(enum.IntEnum):
    VERSION = 1
    AGENT = 2
    PID = 3
    INIT = 4
    WINDOW = 5
    MAX_PAYLOAD = 6
    ARGV = 16
    ENV = 17
    CWD = 18
    USER = 19
    UID = 20
    GID = 21
    STDIN = 22
    PTY = 23
    ROWS = 24
    COLS = 25
    TIMEOUT_MS = 26
    CLEAR_ENV = 27
    EXIT_CODE = 32
    SIGNAL = 33
    TIMED_OUT = 34
    CORE_DUMPED = 35
    CODE = 40
    ERRNO = 41
    MESSAGE = 42
    PATH = 48
    MODE = 49
    SIZE = 50
    TYPE = 51
    MTIME_NS = 52
    NAME = 53
    ENTRY = 54
    TARGET = 55
    PARENTS = 56
    RECURSIVE = 57
    FOLLOW = 58
    OFFSET = 59
    LENGTH = 60
    APPEND = 61
    ENTROPY = 64
    TIME_NS = 65
    ENTROPY_ADDED = 66
    RESEEDED = 67
    CLOCK_STEPPED = 68
    CLOCK_OFFSET_NS = 69


class ErrorCode(enum.IntEnum):
    PROTOCOL = 1
    COMMAND_NOT_FOUND = 2
    PERMISSION = 3
    BAD_CWD = 4
    NOT_FOUND = 5
    EXISTS = 6
    NOT_A_DIRECTORY = 7
    IS_A_DIRECTORY = 8
    NOT_EMPTY = 9
    INVALID = 10
    IO = 11
    BUSY = 12
    BAD_USER = 13
    EXEC_FAILED = 14


FILE_TYPES = {1: "file", 2: "dir", 3: "symlink", 4: "char", 5: "block", 6: "fifo", 7: "socket"}


@dataclass(frozen=True, slots=True)
class Frame:
    type: int
    id: int
    flags: int
    payload: bytes


def encode_frame(type: int, id: int, payload: bytes = b"", flags: int = 0) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(len(payload), id, type, flags) + payload


FieldValue = int | bool | bytes | str


def encode_fields(fields: Iterable[tuple[int, FieldValue]]) -> bytes:
    """Fields in order; a list value is several fields with one tag."""
    out = bytearray()
    for tag, value in fields:
        if isinstance(value, bool | int):
            raw = _INT.pack(int(value))
        elif isinstance(value, str):
            # surrogateescape round-trips the bytes of non-UTF-8 argv and paths
            raw = value.encode("utf-8", "surrogateescape")
        else:
            raw = bytes(value)
        out += _FIELD_HEADER.pack(tag, len(raw)) + raw
    return bytes(out)


class Fields:
    """Decoded control payload: every value of every tag, in order."""

    def __init__(self, payload: bytes) -> None:
        self._values: dict[int, list[bytes]] = {}
        view = memoryview(payload)
        offset = 0
        while offset < len(view):
            if len(view) - offset < _FIELD_HEADER.size:
                raise ProtocolError(f"truncated field header at offset {offset}")
            tag, length = _FIELD_HEADER.unpack_from(view, offset)
            offset += _FIELD_HEADER.size
            if length > len(view) - offset:
                raise ProtocolError(f"field {tag} of {length} bytes runs past the payload")
            self._values.setdefault(tag, []).append(bytes(view[offset : offset + length]))
            offset += length

    def has(self, tag: int) -> bool:
        return tag in self._values

    def all(self, tag: int) -> list[bytes]:
        return self._values.get(tag, [])

    def get_bytes(self, tag: int, default: bytes = b"") -> bytes:
        values = self._values.get(tag)
        return values[-1] if values else default

    def get_str(self, tag: int, default: str = "") -> str:
        values = self._values.get(tag)
        return values[-1].decode("utf-8", "surrogateescape") if values else default

    def get_int(self, tag: int, default: int | None = None) -> int | None:
        values = self._values.get(tag)
        if not values:
            return default
        if len(values[-1]) != _INT.size:
            raise ProtocolError(f"field {tag} is not an 8-byte integer")
        return int(_INT.unpack(values[-1])[0])

    def require_int(self, tag: int) -> int:
        value = self.get_int(tag)
        if value is None:
            raise ProtocolError(f"missing integer field {Field(tag).name}")
        return value


def encode_credit(data_type: int, amount: int) -> bytes:
    return _CREDIT.pack(data_type, 0, amount)


def decode_credit(payload: bytes) -> tuple[int, int]:
    if len(payload) != _CREDIT.size:
        raise ProtocolError(f"CREDIT payload of {len(payload)} bytes, expected {_CREDIT.size}")
    data_type, _, amount = _CREDIT.unpack(payload)
    return data_type, amount


class FrameDecoder:
    """Cuts a byte stream into frames. The agent never sends a payload over
    MAX_PAYLOAD, so one that claims more means the stream is out of sync."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self._buffer += data
        frames: list[Frame] = []
        offset = 0
        while len(self._buffer) - offset >= HEADER.size:
            length, id, type, flags = HEADER.unpack_from(self._buffer, offset)
            if length > MAX_PAYLOAD:
                raise ProtocolError(f"agent sent a frame of {length} bytes (max {MAX_PAYLOAD})")
            end = offset + HEADER.size + length
            if end > len(self._buffer):
                break
            frames.append(Frame(type, id, flags, bytes(self._buffer[offset + HEADER.size : end])))
            offset = end
        del self._buffer[:offset]
        return frames
