"""Apply OCI layer tarballs to a directory, the way a container runtime does.

Blocking code: run it in a worker thread (anyio.to_thread.run_sync).

Safety: every entry name is relative and free of "..", and every directory
on the way to it is resolved inside the root, following symlinks as a
chroot would (an absolute target is relative to the root). A path whose
symlinks climb above the root is rejected with UnsafeLayer before anything
is written, so a layer can never touch a file outside the root.

Whiteouts (.wh.NAME) delete NAME from lower layers; an opaque marker
(.wh..wh..opq) hides everything the lower layers had in its directory but
keeps what this layer put there, in whichever order the tar lists them.
"""

from __future__ import annotations

import errno
import gzip
import os
import shutil
import stat
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import zstandard

from cellvm.errors import ImageError, UnsafeLayer

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
XATTR_PAX_PREFIX = "SCHILY.xattr."
MAX_SYMLINK_HOPS = 40


@dataclass
class UnpackStats:
    """What could not be reproduced exactly (as a non-root user, say)."""

    entries: int = 0
    skipped_devices: list[str] = field(default_factory=list)
    dropped_xattrs: int = 0
    ownership_kept: bool = True


@contextmanager
def open_layer(path: Path) -> Iterator[BinaryIO]:
    """The uncompressed tar stream of a layer blob; the compression is told by its magic bytes,
    since media types are sometimes wrong (docker-archive layers are plain tar)."""
    with open(path, "rb") as raw:
        magic = raw.read(4)
        raw.seek(0)
        if magic[:2] == b"\x1f\x8b":
            with gzip.GzipFile(fileobj=raw) as stream:
                yield stream  # type: ignore[misc]
        elif magic == b"\x28\xb5\x2f\xfd":
            with zstandard.ZstdDecompressor().stream_reader(raw, read_size=1 << 20) as stream:
                yield stream  # type: ignore[misc]
        else:
            yield raw


def clean_name(name: str) -> list[str]:
    """Entry name -> path components, rejecting absolute names and "..". [] is the root itself."""
    if name.startswith("/"):
        raise UnsafeLayer(f"layer entry {name!r} is an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeLayer(f"layer entry {name!r} climbs out with '..'")
    return parts


class LayerApplier:
    """Applies layers in order onto ``root``; one instance per root filesystem."""

    def __init__(self, root: Path, *, keep_ownership: bool | None = None) -> None:
        self.root = os.fspath(root)
        self.keep_ownership = os.geteuid() == 0 if keep_ownership is None else keep_ownership
        self.stats = UnpackStats(ownership_kept=self.keep_ownership)
        # Entry parent (as named in the tar) -> resolved parent that exists as a directory.
        # Only symlinks change how a path resolves, so creating or removing a symlink (or a
        # directory that may hold some) forgets it all; layers list siblings together, so
        # most entries hit.
        self._parents: dict[tuple[str, ...], list[str]] = {}

    # -- path resolution -------------------------------------------------------------

    def _resolve(self, parts: list[str], *, hops: int = 0) -> list[str]:
        """Resolve directory components inside the root, following symlinks chroot-style."""
        resolved: list[str] = []
        for index, part in enumerate(parts):
            candidate = os.path.join(self.root, *resolved, part)
            try:
                st = os.lstat(candidate)
            except FileNotFoundError:
                resolved.append(part)
                continue
            if not stat.S_ISLNK(st.st_mode):
                resolved.append(part)
                continue
            if hops >= MAX_SYMLINK_HOPS:
                raise UnsafeLayer(f"too many symlinks resolving {'/'.join(parts)!r}")
            target = os.readlink(candidate)
            base = [] if target.startswith("/") else list(resolved)
            for piece in target.split("/"):
                if piece in ("", "."):
                    continue
                if piece == "..":
                    if not base:
                        raise UnsafeLayer(
                            f"{'/'.join(parts)!r} goes through symlink {'/'.join(resolved + [part])!r}"
                            f" -> {target!r}, which leads out of the root"
                        )
                    base.pop()
                else:
                    base.append(piece)
            return self._resolve(base + parts[index + 1 :], hops=hops + 1)
        return resolved

    def _path(self, parts: list[str]) -> str:
        return os.path.join(self.root, *parts)

    def _ensure_directories(self, parts: list[str]) -> None:
        for depth in range(1, len(parts) + 1):
            path = self._path(parts[:depth])
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                os.mkdir(path, 0o755)
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise ImageError(f"layer entry needs {'/'.join(parts[:depth])!r} to be a directory")

    # -- applying ----------------------------------------------------------------------

    def apply(self, layer: Path) -> None:
        with open_layer(layer) as stream:
            self.apply_stream(stream)

    def apply_stream(self, stream: BinaryIO) -> None:
        created: set[str] = set()
        directories: list[tuple[str, tarfile.TarInfo]] = []
        try:
            archive = tarfile.open(fileobj=stream, mode="r|")
        except tarfile.TarError as exc:
            raise ImageError(f"layer is not a tar archive: {exc}") from exc
        try:
            for member in archive:
                self.stats.entries += 1
                parts = clean_name(member.name)
                if not parts:
                    continue  # the root directory's own entry: its metadata is the image's concern, not ours
                key = tuple(parts[:-1])
                known = self._parents.get(key)
                parent = known if known is not None else self._resolve(parts[:-1])
                base = parts[-1]
                if base == OPAQUE_MARKER:
                    self._make_opaque(parent, created)
                    continue
                if base.startswith(WHITEOUT_PREFIX):
                    hidden = base[len(WHITEOUT_PREFIX) :]
                    if hidden in ("", ".", ".."):
                        raise UnsafeLayer(f"malformed whiteout {member.name!r}")
                    self._remove(self._path(parent + [hidden]))
                    continue
                if known is None:
                    self._ensure_directories(parent)
                    self._parents[key] = parent
                target = parent + [base]
                created.add("/".join(target))
                self._extract(archive, member, target, directories)
        except tarfile.TarError as exc:
            raise ImageError(f"layer tar is corrupt: {exc}") from exc
        finally:
            archive.close()
        # Directories last and deepest first: writing their children changed their mtimes,
        # and a read-only mode set earlier would have stopped those writes.
        for path, member in reversed(directories):
            self._set_metadata(path, member)

    def _extract(
        self,
        archive: tarfile.TarFile,
        member: tarfile.TarInfo,
        parts: list[str],
        directories: list[tuple[str, tarfile.TarInfo]],
    ) -> None:
        path = self._path(parts)
        try:
            existing = os.lstat(path)
        except FileNotFoundError:
            existing = None
        if member.isdir():
            if existing and not stat.S_ISDIR(existing.st_mode):
                self._remove(path)
                existing = None
            if existing is None:
                os.mkdir(path, 0o755)
            directories.append((path, member))
            return
        if existing:
            self._remove(path)
        if member.isreg():
            source = archive.extractfile(member)
            assert source is not None
            with open(path, "xb") as out:  # "x": never follows a symlink planted at this name
                shutil.copyfileobj(source, out, 1 << 20)
        elif member.issym():
            os.symlink(member.linkname, path)
            self._parents.clear()
        elif member.islnk():
            link_parts = clean_name(member.linkname)
            if not link_parts:
                raise UnsafeLayer(f"hardlink {member.name!r} points at the root")
            target = self._path(self._resolve(link_parts[:-1]) + [link_parts[-1]])
            try:
                os.link(target, path, follow_symlinks=False)
            except FileNotFoundError as exc:
                raise ImageError(f"hardlink {member.name!r} -> {member.linkname!r}: target missing") from exc
            return  # the inode's metadata belongs to the target's entry
        elif member.ischr() or member.isblk():
            if not self.keep_ownership:
                # Only root may create device nodes; the guest's devtmpfs provides them anyway.
                self.stats.skipped_devices.append("/".join(parts))
                return
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            os.mknod(path, kind | (member.mode & 0o7777), os.makedev(member.devmajor, member.devminor))
        elif member.isfifo():
            os.mkfifo(path, member.mode & 0o7777)
        else:
            raise ImageError(f"layer entry {member.name!r} has unsupported type {member.type!r}")
        self._set_metadata(path, member)

    def _set_metadata(self, path: str, member: tarfile.TarInfo) -> None:
        is_link = member.issym()
        if self.keep_ownership:
            os.lchown(path, member.uid, member.gid)  # before chmod: chown clears set-uid bits
        if not is_link:
            mode = member.mode & 0o7777
            if member.isdir() and not self.keep_ownership:
                mode |= 0o700  # without root we must still be able to write later layers into it
            os.chmod(path, mode)
        for key, value in member.pax_headers.items():
            if key.startswith(XATTR_PAX_PREFIX):
                try:
                    os.setxattr(
                        path, key[len(XATTR_PAX_PREFIX) :], value.encode("utf-8", "surrogateescape"), follow_symlinks=False
                    )
                except OSError as exc:
                    if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EACCES):
                        raise
                    self.stats.dropped_xattrs += 1
        os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)

    def _remove(self, path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)
            self._parents.clear()
        else:
            os.unlink(path)
            if stat.S_ISLNK(st.st_mode):
                self._parents.clear()

    def _make_opaque(self, parent: list[str], created: set[str]) -> None:
        """Remove what lower layers put under ``parent``; keep this layer's entries and their ancestors."""
        directory = self._path(parent)
        prefix = "/".join(parent)
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return
        for name in names:
            relative = f"{prefix}/{name}" if prefix else name
            if relative in created:
                if os.path.isdir(os.path.join(directory, name)) and not os.path.islink(os.path.join(directory, name)):
                    self._make_opaque(parent + [name], created)
                continue
            if any(path.startswith(relative + "/") for path in created):
                self._make_opaque(parent + [name], created)
                continue
            self._remove(os.path.join(directory, name))


def apply_layers(root: Path, layers: list[Path], *, keep_ownership: bool | None = None) -> UnpackStats:
    """Apply ``layers`` (bottom first) onto the empty directory ``root``."""
    applier = LayerApplier(root, keep_ownership=keep_ownership)
    for layer in layers:
        applier.apply(layer)
    return applier.stats

