"""Build step of a pull: unpack the layers and make the rootfs image, keeping ownership.

As root this runs in a worker thread. Without root, the layers' owners,
device nodes and privileged xattrs cannot be written to a real directory,
so the same code runs under `fakeroot` in a child process: chown and mknod
are recorded by fakeroot and mkfs (a child of the same session) sees them,
which keeps the image's ownership exact without any privilege. Without
fakeroot either, the image is built owned by the caller (UnpackStats says so).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio

from cellvm.errors import ImageError
from cellvm.images.config import ImageConfig, image_config_from_json
from cellvm.images.manifest import Manifest, parse_manifest_or_index
from cellvm.images.rootfs import RootfsFormat, build_rootfs
from cellvm.images.store import ImageStore
from cellvm.images.unpack import LayerApplier

UNPACK_PREFIX = "cellvm-unpack-"


async def _arrived(digest: str) -> None:
    """The default for build_image: every blob is already in the cache."""


async def build_image(
    store: ImageStore,
    manifest_digest: str,
    staging: Path,
    fmt: RootfsFormat,
    *,
    wait_for: Callable[[str], Awaitable[None]] = _arrived,
) -> ImageConfig:
    """Unpack ``manifest_digest``'s layers and write staging/rootfs.<fmt>.

    ``wait_for(digest)`` returns once that blob is in the cache: layers are
    unpacked in order as their downloads finish, overlapping the rest of the
    download (a fakeroot build starts when everything is here).
    """
    manifest = parse_manifest_or_index(store.blobs.read_bytes(manifest_digest))
    assert isinstance(manifest, Manifest)
    fakeroot = shutil.which("fakeroot")
    if os.geteuid() != 0 and fakeroot is not None:
        for descriptor in (*manifest.layers, manifest.config):
            await wait_for(descriptor.digest)
        command = [fakeroot, "--", sys.executable, "-m", "cellvm.images.build", str(store.root), manifest_digest, str(staging), fmt]
        result = await anyio.run_process(command, check=False)
        if result.returncode != 0:
            raise ImageError(f"building the rootfs under fakeroot failed: {result.stderr.decode(errors='replace')[-2000:]}")
        return ImageConfig.from_json(json.loads((staging / "config.json").read_text()))

    builder = await anyio.to_thread.run_sync(TreeBuilder, store, manifest, manifest_digest, staging, fmt)
    try:
        for layer in manifest.layers:
            await wait_for(layer.digest)
            await anyio.to_thread.run_sync(builder.apply, layer.digest)
        await wait_for(manifest.config.digest)
        return await anyio.to_thread.run_sync(builder.finish)
    finally:
        with anyio.CancelScope(shield=True):  # a cancelled pull must not leave the tree on tmpfs
            await anyio.to_thread.run_sync(builder.discard)


class TreeBuilder:
    """One rootfs in the making (blocking methods, for a worker thread): layers are applied to a
    scratch tree one by one, then the config is resolved and the filesystem image written."""

    def __init__(self, store: ImageStore, manifest: Manifest, manifest_digest: str, staging: Path, fmt: RootfsFormat) -> None:
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        self.store, self.manifest, self.staging, self.fmt = store, manifest, staging, fmt
        self.tree = unpack_directory(store, sum(layer.size for layer in manifest.layers), manifest_digest)
        self.applier = LayerApplier(self.tree)

    def apply(self, layer_digest: str) -> None:
        self.applier.apply(self.store.blobs.path(layer_digest))

    def finish(self) -> ImageConfig:
        config = image_config_from_json(self.store.blobs.read_bytes(self.manifest.config.digest), self.tree)
        build_rootfs(self.tree, self.staging / f"rootfs.{self.fmt}", self.fmt)
        (self.staging / "config.json").write_text(json.dumps(config.to_json()))
        return config

    def discard(self) -> None:
        shutil.rmtree(self.tree, ignore_errors=True)


def build_blocking(store: ImageStore, manifest_digest: str, staging: Path, fmt: RootfsFormat) -> ImageConfig:
    """The whole build in one call, every blob already cached (the fakeroot child runs this)."""
    manifest = parse_manifest_or_index(store.blobs.read_bytes(manifest_digest))
    assert isinstance(manifest, Manifest)
    builder = TreeBuilder(store, manifest, manifest_digest, staging, fmt)
    try:
        for layer in manifest.layers:
            builder.apply(layer.digest)
        return builder.finish()
    finally:
        builder.discard()


def unpack_directory(store: ImageStore, compressed_size: int, digest: str) -> Path:
    """A fresh directory to unpack into, on tmpfs when it has room.

    The tree is scratch (mkfs reads it once, then it is deleted), and creating
    thousands of small files is several times faster on tmpfs than on disk.
    Room means about six times the compressed layers (the usual expansion of
    a gzip'd root filesystem, with margin); CELLVM_UNPACK_DIR overrides.
    """
    parent = Path(os.environ.get("CELLVM_UNPACK_DIR") or store.blobs.tmp_dir)
    shm = Path("/dev/shm")
    if "CELLVM_UNPACK_DIR" not in os.environ and shm.is_dir() and os.access(shm, os.W_OK):
        free = shutil.disk_usage(shm).free
        if compressed_size * 6 + (256 << 20) < free and compressed_size < (2 << 30):
            parent = shm
    parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_trees(parent)
    tree = parent / f"{UNPACK_PREFIX}{digest.split(':')[1][:16]}-{os.getpid()}"
    if tree.exists():
        shutil.rmtree(tree)
    tree.mkdir()
    return tree


def _remove_abandoned_trees(parent: Path) -> None:
    """Trees whose process died (a killed pull) would hold tmpfs memory forever: drop them."""
    for tree in parent.glob(f"{UNPACK_PREFIX}*-*"):
        pid = tree.name.rsplit("-", 1)[1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(tree, ignore_errors=True)
        except PermissionError:
            pass  # someone else's live process


if __name__ == "__main__":
    # The fakeroot child: python -m cellvm.images.build STORE_ROOT MANIFEST_DIGEST STAGING FORMAT
    root, digest, staging_dir, rootfs_format = sys.argv[1:5]
    build_blocking(ImageStore(Path(root)), digest, Path(staging_dir), rootfs_format)  # type: ignore[arg-type]
