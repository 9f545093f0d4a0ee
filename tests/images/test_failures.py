"""What goes wrong: a missing tag, a corrupted blob, a registry that dies mid-pull,
and two processes pulling the same image at once."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from imagehelpers import CountingReporter, assert_cache_valid, isolate_config
from support.registry import Registry, push_test_images, start_registry

from cellvm.errors import DigestMismatch, ImageNotFound, RegistryUnavailable
from cellvm.images import ImageStore, RetryPolicy, pull

pytestmark = pytest.mark.anyio
QUICK_RETRY = RetryPolicy(attempts=3, first_delay=0.05)


@pytest.fixture
async def own_registry(images_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Registry]:
    """A registry of this test's own (it gets corrupted or killed), holding busybox and big."""
    with start_registry(tmp_path / "registry") as registry:
        await push_test_images(registry, only={"busybox", "big"})
        isolate_config(monkeypatch, tmp_path)
        for key, value in registry.mirror_env().items():
            monkeypatch.setenv(key, value)
        yield registry


async def test_missing_tag_and_repository(mirror_env: Registry, store: ImageStore) -> None:
    with pytest.raises(ImageNotFound):
        await pull("busybox:no-such-tag", store=store)
    with pytest.raises(ImageNotFound):
        await pull("no-such/repository", store=store)


async def test_unreachable_registry(store: ImageStore, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    isolate_config(monkeypatch, tmp_path)
    with start_registry(tmp_path / "gone") as registry:
        host = registry.host
    with pytest.raises(RegistryUnavailable):
        await pull(f"{host}/busybox", store=store, retry=QUICK_RETRY)


async def test_corrupted_blob_is_a_digest_mismatch_and_never_cached(own_registry: Registry, store: ImageStore) -> None:
    image = await pull("busybox", store=ImageStore(store.root.parent / "reference"))
    layer = image.layers[0]
    data = own_registry.blob_data_path(layer)
    corrupted = bytearray(data.read_bytes())
    corrupted[len(corrupted) // 2] ^= 0xFF
    data.write_bytes(bytes(corrupted))

    with pytest.raises(DigestMismatch):
        await pull("busybox", store=store)
    assert not store.blobs.has(layer)
    assert not list(store.rootfs_dir.glob("*")) if store.rootfs_dir.exists() else True
    assert_cache_valid(store)


async def test_registry_stopped_mid_pull_then_the_next_pull_resumes(own_registry: Registry, store: ImageStore) -> None:
    class KillMidway(CountingReporter):
        def layer_advanced(self, digest: str, nbytes: int) -> None:
            super().layer_advanced(digest, nbytes)
            if self.bytes > 8 * 1024 * 1024:
                own_registry.kill_now()

    with pytest.raises(RegistryUnavailable):
        await pull("cellvm-test/big", store=store, reporter=KillMidway(), retry=QUICK_RETRY)
    assert_cache_valid(store)
    partials = list(store.blobs.tmp_dir.glob("*.partial"))
    assert len(partials) == 1 and partials[0].stat().st_size > 0, "the interrupted download is kept for resuming"
    kept = partials[0].stat().st_size

    own_registry.start()
    resumed = CountingReporter()
    image = await pull("cellvm-test/big", store=store, reporter=resumed, retry=QUICK_RETRY)
    assert store.blobs.has(image.layers[0])
    assert not list(store.blobs.tmp_dir.glob("*.partial"))
    # The reporter is told the kept bytes first, so the bytes that moved are the rest.
    size = store.blobs.path(image.layers[0]).stat().st_size
    assert resumed.bytes == size and kept < size
    assert_cache_valid(store)


async def test_two_processes_pull_one_image_at_once(own_registry: Registry, tmp_path: Path) -> None:
    env = {**os.environ, "CELLVM_CACHE": str(tmp_path / "shared-cache"), **own_registry.mirror_env()}
    command = [sys.executable, "-m", "cellvm.cli", "pull", "cellvm-test/big"]
    results: list[subprocess.CompletedProcess[bytes]] = []

    async def run_one() -> None:
        results.append(await anyio.run_process(command, env=env, check=False))

    with anyio.fail_after(120):
        async with anyio.create_task_group() as group:
            group.start_soon(run_one)
            group.start_soon(run_one)
    for result in results:
        assert result.returncode == 0, result.stderr.decode()
    assert len({result.stdout.split()[1] for result in results}) == 1, "both resolve to the same manifest"
    store = ImageStore(tmp_path / "shared-cache" / "images")
    assert len(list(store.rootfs_dir.iterdir())) == 1
    assert not list(store.blobs.tmp_dir.glob("*.partial"))
    assert_cache_valid(store)


async def test_an_unsafe_layer_fails_the_pull_and_leaves_nothing_behind(store: ImageStore, tmp_path: Path) -> None:
    from testimages import Entry, Layout, compress, tar_entries

    from cellvm.errors import UnsafeLayer
    from cellvm.images.build import UNPACK_PREFIX

    layout = Layout(tmp_path / "evil")
    layers = [
        compress(tar_entries([Entry("ok", data=b"fine")])),
        compress(tar_entries([Entry("escape", "symlink", target="../../.."), Entry("escape/tmp/pwned", data=b"x")])),
    ]
    layout.tag(layout.add_image(layers, {"Cmd": ["/ok"]}), "latest")
    with pytest.raises(UnsafeLayer):
        await pull(f"oci:{tmp_path / 'evil'}:latest", store=store)
    assert not Path("/tmp/pwned").exists()
    assert not list(store.rootfs_dir.glob("*")) if store.rootfs_dir.exists() else True
    scratch_dirs = (Path("/dev/shm"), store.blobs.tmp_dir)
    leftovers = [tree for directory in scratch_dirs for tree in directory.glob(f"{UNPACK_PREFIX}*-{os.getpid()}")]
    assert leftovers == []
    assert_cache_valid(store)
