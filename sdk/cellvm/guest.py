"""The guest side of a sandbox: where the kernel and the agent are on this
machine, the initramfs that carries the agent as PID 1 with the image's
run config, and the kernel command line (docs/PROTOCOL.md, "As PID 1").
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cellvm.errors import GuestNotBuilt


def cache_dir() -> Path:
    return Path(os.environ.get("CELLVM_CACHE") or Path.home() / ".cache" / "cellvm")


def _artifact(env: str, relative: str, what: str) -> Path:
    path = Path(os.environ.get(env) or cache_dir() / relative)
    if not path.is_file():
        raise GuestNotBuilt(f"no {what} at {path}: run ./dev setup (or set {env})")
    return path.resolve()


def kernel_path() -> Path:
    """Our PVM guest vmlinux (guest/kernel, stage 20-kernel)."""
    return _artifact("CELLVM_KERNEL", "kernel/vmlinux", "guest kernel")


def agent_path() -> Path:
    """The static guest agent (guest/agent, stage 25-agent)."""
    return _artifact("CELLVM_AGENT", "agent/cellvm-agent", "guest agent")


def file_digest(path: Path) -> str:
    """sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class RunConfig:
    """What the agent applies before serving: the image's Env, WorkingDir and
    User, with the Sandbox's overrides already merged in."""

    env: Mapping[str, str]
    workdir: str
    user: str
    hostname: str = "cellvm"

    def records(self) -> bytes:
        """The agent's config file: `key=value` records, each ended by NUL."""
        out = [f"env={name}={value}" for name, value in self.env.items()]
        out += [f"workdir={self.workdir}", f"user={self.user}", f"hostname={self.hostname}"]
        return b"".join(record.encode() + b"\0" for record in out)


class _Cpio:
    """A gzip'd newc cpio archive: what the kernel unpacks as its initramfs."""

    def __init__(self) -> None:
        self._raw = io.BytesIO()
        self._ino = 1

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        name_bytes = name.encode() + b"\0"
        fields = [self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name_bytes), 0]
        self._ino += 1
        self._raw.write(b"070701" + b"".join(b"%08X" % f for f in fields))
        self._raw.write(name_bytes + b"\0" * (-(110 + len(name_bytes)) % 4))
        self._raw.write(data + b"\0" * (-len(data) % 4))

    def finish(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return gzip.compress(self._raw.getvalue(), compresslevel=6, mtime=0)


def build_initramfs(agent: Path, config: RunConfig, output: Path) -> None:
    """/init = the agent, /dev/console for its early messages, /cellvm/config."""
    archive = _Cpio()
    archive.add("dev", stat.S_IFDIR | 0o755)
    archive.add("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    archive.add("cellvm", stat.S_IFDIR | 0o755)
    archive.add("cellvm/config", stat.S_IFREG | 0o644, config.records())
    archive.add("init", stat.S_IFREG | 0o755, agent.read_bytes())
    tmp = output.with_name(output.name + f".tmp{os.getpid()}")
    tmp.write_bytes(archive.finish())
    os.replace(tmp, output)


# Anonymous memory in 64 KiB folios (multi-size THP): one guest page fault
# maps 16 pages. Every fault costs about three VM exits on kvm-pvm (the #PF
# reflected to the guest, its page-table write, the retry's shadow fault),
# so first-touch cost falls with the number of faults: 55 -> 6.6 us per
# 4 KiB page (host 1.4 us) in benchmarks/guest.py. 2 MiB THP stays
# madvise-only: it would dirty snapshots 2 MiB at a time.
THP_ANON = "thp_anon=64K:always"

# File faults map up to 2 MiB of what the page cache already holds around
# the faulting page (guest kernel patch 0018; 64 KiB by default): a program
# starting from the page cache takes fewer faults, each about three VM exits
# here. busybox `echo`: 39 -> 17 guest page faults.
FAULT_AROUND = "fault_around_bytes=2M"


def kernel_cmdline(*, rootfs_format: str, root_device: str = "/dev/vda", extra: Iterable[str] = ()) -> str:
    """The guest kernel's command line for a sandbox. Quiet: every console
    byte is a port-I/O exit (~30 us here), so a chatty boot is a slow boot."""
    args = [
        "console=ttyS0",
        "quiet",
        "loglevel=3",
        "reboot=k",
        "panic=-1",
        "poweroff_port=0xf4",
        THP_ANON,
        FAULT_AROUND,
        f"cellvm.root={root_device}",
        f"cellvm.rootfstype={rootfs_format}",
        *extra,
    ]
    return " ".join(args)
