"""Pull benchmark, one run: cellvm vs `skopeo copy` from the same local registry.

    .venv/bin/python benchmarks/pull.py            (needs the test images: scripts/stages/30-test-images.sh)

Prints, for python:3.11 from a local docker-registry on 127.0.0.1:
  - fetch: resolve + download + verify all blobs (cellvm) vs skopeo copy to an OCI layout
  - the full cellvm pull (fetch + unpack + mkfs), and a re-pull (blobs moved, time)
  - rootfs build time and size, EROFS vs ext4, for busybox, python:3.11 and node:24
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from support.registry import push_test_images, start_registry  # noqa: E402

from cellvm.images import ImageStore, PullReporter, pull  # noqa: E402
from cellvm.images.build import unpack_directory  # noqa: E402
from cellvm.images.rootfs import build_rootfs  # noqa: E402
from cellvm.images.unpack import apply_layers  # noqa: E402


class Timeline(PullReporter):
    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.fetched_at: float | None = None
        self.moved = 0

    def layer_finished(self, digest: str) -> None:
        self.moved += 1

    def building(self, fmt: str) -> None:
        self.fetched_at = time.perf_counter()


def mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


async def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="cellvm-bench-"))
    try:
        with start_registry(work / "registry") as registry:
            await push_test_images(registry, only={"python", "node", "busybox"})
            os.environ.update(registry.mirror_env())
            os.environ["CELLVM_REGISTRIES_CONFIG"] = str(work / "none.toml")

            started = time.perf_counter()
            subprocess.run(
                ["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                 f"docker://{registry.host}/library/python:3.11", f"oci:{work / 'skopeo'}:3.11"],
                check=True,
            )  # fmt: skip
            skopeo_time = time.perf_counter() - started

            store = ImageStore(work / "cache")
            timeline = Timeline()
            image = await pull("python:3.11", store=store, reporter=timeline)
            total = time.perf_counter() - timeline.start
            assert timeline.fetched_at is not None
            fetch = timeline.fetched_at - timeline.start
            blob_bytes = sum(store.blobs.path(d).stat().st_size for d in image.layers)

            again = Timeline()
            await pull("python:3.11", store=store, reporter=again)
            repull = time.perf_counter() - again.start

            print(f"python:3.11 ({len(image.layers)} layers, {mb(blob_bytes)} compressed)")
            print(f"  skopeo copy to OCI layout  {skopeo_time:7.2f} s")
            print(f"  cellvm fetch (verified)    {fetch:7.2f} s   {fetch / skopeo_time:.2f}x skopeo")
            print(f"  cellvm full pull + rootfs  {total:7.2f} s   (rootfs {mb(image.size)} EROFS)")
            print(f"  re-pull                    {repull * 1000:7.1f} ms, {again.moved} blobs moved")

            print("rootfs build (unpack once, then each format):")
            print(f"  {'image':12} {'unpacked':>10} {'unpack':>8} {'erofs':>8} {'size':>10} {'ext4':>8} {'size':>10}")
            for name in ("busybox", "python:3.11", "node:24"):
                pulled = await pull(name, store=store)
                tree = unpack_directory(store, sum(store.blobs.path(d).stat().st_size for d in pulled.layers), pulled.digest)
                t0 = time.perf_counter()
                await anyio.to_thread.run_sync(apply_layers, tree, [store.blobs.path(d) for d in pulled.layers])
                t1 = time.perf_counter()
                await anyio.to_thread.run_sync(build_rootfs, tree, work / "r.erofs", "erofs")
                t2 = time.perf_counter()
                await anyio.to_thread.run_sync(build_rootfs, tree, work / "r.ext4", "ext4")
                t3 = time.perf_counter()
                unpacked = int(subprocess.run(["du", "-sb", str(tree)], capture_output=True, text=True).stdout.split()[0])
                erofs_size = (work / "r.erofs").stat().st_size
                ext4_size = int(subprocess.run(["du", "-B1", str(work / "r.ext4")], capture_output=True, text=True).stdout.split()[0])
                ext4_apparent = (work / "r.ext4").stat().st_size
                print(
                    f"  {name:12} {mb(unpacked):>10} {t1 - t0:7.2f}s {t2 - t1:7.2f}s {mb(erofs_size):>10}"
                    f" {t3 - t2:7.2f}s {mb(ext4_size):>10} (file {mb(ext4_apparent)})"
                )
                shutil.rmtree(tree)
            print(f"  (unpack into {tree.parent}; erofs size = file size; ext4 = blocks used, file = apparent size)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    anyio.run(main)
