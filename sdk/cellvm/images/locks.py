"""Inter-process file locks that an anyio task can wait on without blocking the loop."""

from __future__ import annotations

import fcntl
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio


@asynccontextmanager
async def file_lock(path: Path, *, shared: bool = False, poll_interval: float = 0.05) -> AsyncIterator[None]:
    """Hold an flock on ``path``: exclusive, or shared with other shared holders.

    Polls with LOCK_NB rather than blocking in a worker thread, so waiting
    stays cancellable. flock locks vanish with their process, so a crashed
    puller never leaves a stale lock behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        delay = poll_interval / 5
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await anyio.sleep(delay)
                delay = min(delay * 2, poll_interval)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
