"""Turn an unpacked root directory into a filesystem image the guest mounts read-only.

EROFS is the default (see BENCHMARKS.md, "Pull"): the image is read-only
anyway (the guest puts a writable overlay on top), so EROFS's compact,
no-free-space layout is smaller than ext4 and builds faster, and
mkfs.erofs needs no size guess. ext4 (mkfs.ext4 -d) stays available for
guest kernels built without EROFS.

Both tools copy ownership from the directory, so exact uids/gids need the
unpack to run as root; without root the image is owned by the caller.
Blocking: run in a worker thread.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Literal

from cellvm.errors import ImageError

RootfsFormat = Literal["erofs", "ext4"]
FORMATS: tuple[RootfsFormat, ...] = ("erofs", "ext4")


def _require(tool: str, package: str) -> str:
    path = shutil.which(tool) or next(
        (p for p in (f"/usr/sbin/{tool}", f"/sbin/{tool}") if os.access(p, os.X_OK)), None
    )
    if path is None:
        raise ImageError(f"{tool} not found: install the Debian package {package}")
    return path


def _run(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise ImageError(f"{Path(argv[0]).name} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")


def tree_size(root: Path) -> tuple[int, int]:
    """(bytes of file data, number of inodes) under ``root``; hardlinks counted once."""
    total, inodes, seen = 0, 1, set()
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(directory, name))
            inodes += 1
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total, inodes


def build_rootfs(source: Path, output: Path, fmt: RootfsFormat = "erofs") -> None:
    """Write the filesystem image of ``source`` to ``output`` (replaced if present)."""
    output.unlink(missing_ok=True)
    if fmt == "erofs":
        mkfs = _require("mkfs.erofs", "erofs-utils")
        # Uncompressed: the guest's page cache then maps file data directly, and the blobs are
        # already compressed on the wire.
        _run([mkfs, "--quiet", "--preserve-mtime", str(output), str(source)])
    elif fmt == "ext4":
        mkfs = _require("mkfs.ext4", "e2fsprogs")
        data, inodes = tree_size(source)
        # ext4 needs its size up front: data in 4 KiB blocks plus metadata and 20 % headroom.
        size_kib = max(16 * 1024, int((data * 1.2 + inodes * 4096) / 1024) + 8 * 1024)
        _run(
            [
                mkfs, "-q", "-F", "-t", "ext4", "-b", "4096", "-N", str(inodes + 1024),
                "-O", "^has_journal", "-E", "root_owner=0:0,lazy_itable_init=0",
                "-L", "cellvm-rootfs", "-d", str(source), str(output), f"{size_kib}K",
            ]
        )  # fmt: skip
    else:
        raise ImageError(f"unknown rootfs format {fmt!r} (choose from {', '.join(FORMATS)})")
