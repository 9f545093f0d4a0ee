"""A blocking facade over the async SDK, for scripts:

    from cellvm.blocking import Sandbox

    with Sandbox("python:3.11") as s:
        print(s.exec("python3", "-c", "print(6 * 7)").stdout)

Each sandbox runs its event loop in a thread of its own (an anyio blocking
portal); the async Sandbox lives in one task there for its whole life, as
its task group requires.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import ExitStack
from typing import Any

import anyio.from_thread

from cellvm import sandbox as _async
from cellvm.agent import FileInfo
from cellvm.sandbox import CompletedProcess
from cellvm.snapshot import Snapshot


class Sandbox:
    """cellvm.sandbox.Sandbox, blocking. Same options, same errors."""

    def __init__(self, image: str, **options: Any) -> None:
        self._inner = _async.Sandbox(image, **options)
        self._stack = ExitStack()

    @classmethod
    def from_snapshot(cls, snapshot: Snapshot | str | os.PathLike[str], **options: Any) -> Sandbox:
        sandbox = cls.__new__(cls)
        sandbox._inner = _async.Sandbox.from_snapshot(snapshot, **options)
        sandbox._stack = ExitStack()
        return sandbox

    def __enter__(self) -> Sandbox:
        portal = self._stack.enter_context(anyio.from_thread.start_blocking_portal())
        try:
            self._stack.enter_context(portal.wrap_async_context_manager(self._inner))
        except BaseException:
            self._stack.close()
            raise
        self._portal = portal
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    def exec(
        self,
        *argv: str,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        stdin: bytes | str | None = None,
        timeout: float | None = None,
    ) -> CompletedProcess:
        return self._portal.call(
            lambda: self._inner.exec(*argv, env=env, cwd=cwd, user=user, stdin=stdin, timeout=timeout)
        )

    def read_file(self, path: str) -> bytes:
        return self._portal.call(self._inner.files.read, path)

    def write_file(self, path: str, data: bytes) -> None:
        self._portal.call(self._inner.files.write, path, data)

    def list_dir(self, path: str) -> list[FileInfo]:
        return self._portal.call(self._inner.files.list, path)

    def snapshot(self, path: str | os.PathLike[str] | None = None) -> Snapshot:
        return self._portal.call(self._inner.snapshot, path)
