"""Pulling the test images from a real local registry through the mirror setting."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from imagehelpers import CountingReporter, assert_cache_valid, erofs_inode, extract_rootfs
from support.registry import Registry

from cellvm.errors import ImageError, ImageNotFound
from cellvm.images import ImageStore, pull
from cellvm.images.unpack import apply_layers

pytestmark = pytest.mark.anyio


async def test_layer_semantics_survive_into_the_rootfs(mirror_env: Registry, store: ImageStore, tmp_path: Path) -> None:
    image = await pull("cellvm-test/layers", store=store)
    root = extract_rootfs(image, tmp_path / "rootfs")
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    # whiteouts removed a file and a directory; the opaque dir kept only this layer's entry
    assert "data/delete-me.txt" not in files and "data/old-dir" not in files
    assert [f for f in files if f.startswith("opaque/")] == ["opaque/upper.txt"]
    assert (root / "data" / "keep.txt").read_text() == "replaced\n"
    assert (root / "data" / "new.txt").read_text() == "new\n"
    assert (root / "data" / "zstd.txt").read_text() == "from a zstd layer\n"
    # hardlinks share an inode; symlinks keep their targets, absolute ones untouched
    tool, tool_link = erofs_inode(image, "/bin/tool"), erofs_inode(image, "/bin/tool-link")
    assert tool["NID"] == tool_link["NID"] and tool["Links"] == "2"
    assert os.readlink(root / "bin" / "tool-sym") == "tool-link"
    assert os.readlink(root / "bin" / "abs-sym") == "/data/keep.txt"
    assert stat.S_ISFIFO((root / "pipe").lstat().st_mode)
    owned = (root / "owned.txt").stat()
    assert (owned.st_uid, owned.st_gid, stat.S_IMODE(owned.st_mode)) == (1000, 50, 0o640)
    if os.geteuid() == 0:
        assert stat.S_ISCHR((root / "dev" / "null").lstat().st_mode)

    # What fsck's extraction does not reproduce (set-uid bits, xattrs), checked on the unpacked layers.
    tree = tmp_path / "tree"
    tree.mkdir()
    apply_layers(tree, [store.blobs.path(digest) for digest in image.layers])
    assert stat.S_IMODE((tree / "bin" / "tool").stat().st_mode) == 0o4755
    assert os.getxattr(tree / "xattr.txt", "user.cellvm") == b"hello"
    assert (tree / "data" / "keep.txt").stat().st_mtime == 1700000000

    assert image.config.env["GREETING"] == "hello world"
    assert image.config.working_dir == "/data"
    assert image.config.argv == ("/bin/tool",)
    assert_cache_valid(store)


@pytest.mark.parametrize(
    ("tag", "uid", "gid", "groups", "home"),
    [
        ("user-name", 1000, 1000, (29, 50), "/home/app"),
        ("user-uid-gid", 1000, 50, (29,), "/home/app"),
        ("user-name-group", 1000, 50, (29,), "/home/app"),
        ("user-unknown-uid", 4242, 0, (), "/"),
    ],
)
async def test_non_root_user_is_resolved_from_the_image(
    mirror_env: Registry, store: ImageStore, tag: str, uid: int, gid: int, groups: tuple[int, ...], home: str
) -> None:
    image = await pull(f"cellvm-test/config:{tag}", store=store)
    user = image.config.user
    assert (user.uid, user.gid, user.additional_gids, user.home) == (uid, gid, groups, home)
    assert image.config.env["HOME"] == home


@pytest.mark.parametrize(
    ("tag", "argv", "with_args"),
    [
        ("entrypoint-only", ("/bin/echo", "hi"), ("/bin/echo", "hi", "x")),
        ("cmd-only", ("/bin/sh", "-c", "echo hi"), ("x",)),
        ("entrypoint-and-cmd", ("/bin/echo", "default", "args"), ("/bin/echo", "x")),
    ],
)
async def test_entrypoint_and_cmd(
    mirror_env: Registry, store: ImageStore, tag: str, argv: tuple[str, ...], with_args: tuple[str, ...]
) -> None:
    image = await pull(f"cellvm-test/config:{tag}", store=store)
    assert image.config.argv == argv
    assert image.config.command_for(["x"]) == with_args


async def test_workdir_and_env(mirror_env: Registry, store: ImageStore) -> None:
    config = (await pull("cellvm-test/config:workdir-env", store=store)).config
    assert config.working_dir == "/home/app"
    assert config.env == {"PATH": "/custom/bin:/bin", "A": "1", "B": "x=y", "HOME": "/root"}


async def test_index_picks_the_host_platform_or_the_one_asked_for(
    mirror_env: Registry, store: ImageStore, tmp_path: Path
) -> None:
    amd64 = await pull("cellvm-test/multiarch", store=store)
    arm64 = await pull("cellvm-test/multiarch", store=store, platform="linux/arm64")
    assert amd64.digest != arm64.digest
    assert (extract_rootfs(amd64, tmp_path / "amd64") / "arch").read_text() == "amd64"
    assert (extract_rootfs(arm64, tmp_path / "arm64") / "arch").read_text() == "arm64"
    with pytest.raises(ImageError, match="no manifest for platform linux/riscv64"):
        await pull("cellvm-test/multiarch", store=store, platform="linux/riscv64")


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_busybox_and_a_repull_that_moves_nothing(mirror_env: Registry, store: ImageStore, tmp_path: Path) -> None:
    first = CountingReporter()
    image = await pull("busybox", store=store, reporter=first)
    assert image.name == "busybox:latest"
    assert len(first.downloaded) == 1 and first.built
    root = extract_rootfs(image, tmp_path / "rootfs")
    assert os.readlink(root / "bin" / "sh") == "busybox"
    assert image.config.argv == ("sh",)

    blob_times = {p: p.stat().st_mtime_ns for p in store.blobs.blobs_dir.iterdir()}
    again = CountingReporter()
    same = await pull("docker.io/library/busybox:latest", store=store, reporter=again)
    assert same.digest == image.digest and same.rootfs == image.rootfs
    assert again.downloaded == [] and again.bytes == 0 and not again.built
    assert {p: p.stat().st_mtime_ns for p in store.blobs.blobs_dir.iterdir()} == blob_times


async def test_python_and_node_share_their_base_layer(mirror_env: Registry, store: ImageStore, tmp_path: Path) -> None:
    python = await pull("python:3.11", store=store)
    reporter = CountingReporter()
    node = await pull("node:24", store=store, reporter=reporter)
    assert python.layers[0] == node.layers[0]
    assert reporter.cached == [node.layers[0]] and reporter.downloaded == [node.layers[1]]
    assert python.config.argv == ("python3",) and node.config.argv == ("node",)
    python_root = extract_rootfs(python, tmp_path / "python")
    assert (python_root / "usr" / "bin" / "python3.11").is_file()
    node_root = extract_rootfs(node, tmp_path / "node")
    assert (node_root / "usr" / "local" / "bin" / "node").stat().st_mode & 0o111
    assert (node_root / "etc" / "debian_version").read_text().startswith("12")


async def test_ext4_rootfs(mirror_env: Registry, store: ImageStore, tmp_path: Path) -> None:
    image = await pull("busybox", store=store, rootfs_format="ext4")
    assert image.rootfs.name == "rootfs.ext4"
    root = extract_rootfs(image, tmp_path / "rootfs")
    assert (root / "bin" / "busybox").stat().st_size > 100_000


async def test_pull_by_digest(mirror_env: Registry, store: ImageStore) -> None:
    by_tag = await pull("busybox", store=store)
    by_digest = await pull(f"busybox@{by_tag.digest}", store=store)
    assert by_digest.digest == by_tag.digest and by_digest.name == f"busybox@{by_tag.digest}"
    pinned = await pull(f"busybox:latest@{by_tag.digest}", store=store)
    assert pinned.rootfs == by_tag.rootfs
    with pytest.raises(ImageNotFound):
        await pull("busybox@sha256:" + "0" * 64, store=store)
