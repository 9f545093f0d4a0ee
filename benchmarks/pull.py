"""Pull benchmark, one run: cellvm vs `skopeo copy` from the same local registry.

    .venv/bin/python benchmarks/pull.py     (needs the test images: scripts/stages/30-test-images.sh)

For python:3.11 served by a local docker-registry on 127.0.0.1, prints:
  - fetch: resolve + download + verify every blob into an empty cache (cellvm.images.fetch)
    vs `skopeo copy docker://... oci:DIR` into an empty directory; each 3 times, alternating,
    medians compared (these machines are shared, one sample is noise)
  - the full pull (fetch + unpack + mkfs.erofs) and a re-pull (blobs moved, time)
  - rootfs build time and size, EROFS vs ext4, for busybox, python:3.11 and node:24
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from support.registry import push_test_images, start_registry  # noqa: E402

from cellvm.images import ImageStore, PullReporter, fetch, pull  # noqa: E402
from cellvm.images.build import unpack_directory  # noqa: E402
from cellvm.images.rootfs import build_rootfs  # noqa: E402
from cellvm.images.unpack import apply_layers  # noqa: E402

ROUNDS = 3


class BlobCounter(PullReporter):
    def __init__(self) -> None:
        self.moved = 0

    def layer_finished(self, digest: str) -> None:
        self.moved += 1


def mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def disk_usage(path: Path) -> int:
    return int(subprocess.run(["du", "-sB1", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])


async def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="cellvm-bench-"))
    try:
        with start_registry(work / "registry") as registry:
            await push_test_images(registry, only={"python", "node", "busybox"})
            os.environ.update(registry.mirror_env())
            os.environ["CELLVM_REGISTRIES_CONFIG"] = str(work / "none.toml")

            skopeo_times, fetch_times = [], []
            for round_ in range(ROUNDS):
                target = work / f"skopeo-{round_}"
                started = time.perf_counter()
                await anyio.run_process(
                    ["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                     f"docker://{registry.host}/library/python:3.11", f"oci:{target}:3.11"],
                )  # fmt: skip
                skopeo_times.append(time.perf_counter() - started)
                shutil.rmtree(target)
                cache = ImageStore(work / f"fetch-{round_}")
                started = time.perf_counter()
                await fetch("python:3.11", store=cache)
                fetch_times.append(time.perf_counter() - started)
                shutil.rmtree(cache.root)

            store = ImageStore(work / "cache")
            started = time.perf_counter()
            image = await pull("python:3.11", store=store)
            full = time.perf_counter() - started
            blob_bytes = sum(store.blobs.path(d).stat().st_size for d in image.layers)
            counter = BlobCounter()
            started = time.perf_counter()
            await pull("python:3.11", store=store, reporter=counter)
            repull = time.perf_counter() - started

            skopeo, ours = statistics.median(skopeo_times), statistics.median(fetch_times)
            print(f"python:3.11 ({len(image.layers)} layers, {mb(blob_bytes)} compressed), {ROUNDS} rounds:")
            print(f"  skopeo copy to OCI layout  median {skopeo:5.2f} s  ({', '.join(f'{t:.2f}' for t in skopeo_times)})")
            print(f"  cellvm fetch (verified)    median {ours:5.2f} s  ({', '.join(f'{t:.2f}' for t in fetch_times)})"
                  f"  = {ours / skopeo:.2f}x skopeo")  # fmt: skip
            print(f"  cellvm full pull + rootfs  {full:5.2f} s  (rootfs {mb(image.size)} EROFS)")
            print(f"  re-pull                    {repull * 1000:5.1f} ms, {counter.moved} blobs moved")

            print("rootfs build (unpack once, then each format):")
            print(f"  {'image':12} {'unpacked':>10} {'unpack':>8} {'erofs':>8} {'size':>10} {'ext4':>8} {'used':>10} {'file':>10}")
            for name in ("busybox", "python:3.11", "node:24"):
                pulled = await pull(name, store=store)
                compressed = sum(store.blobs.path(d).stat().st_size for d in pulled.layers)
                tree = unpack_directory(store, compressed, pulled.digest)
                t0 = time.perf_counter()
                await anyio.to_thread.run_sync(apply_layers, tree, [store.blobs.path(d) for d in pulled.layers])
                t1 = time.perf_counter()
                await anyio.to_thread.run_sync(build_rootfs, tree, work / "r.erofs", "erofs")
                t2 = time.perf_counter()
                await anyio.to_thread.run_sync(build_rootfs, tree, work / "r.ext4", "ext4")
                t3 = time.perf_counter()
                print(
                    f"  {name:12} {mb(disk_usage(tree)):>10} {t1 - t0:7.2f}s {t2 - t1:7.2f}s"
                    f" {mb((work / 'r.erofs').stat().st_size):>10} {t3 - t2:7.2f}s"
                    f" {mb(disk_usage(work / 'r.ext4')):>10} {mb((work / 'r.ext4').stat().st_size):>10}"
                )
                shutil.rmtree(tree)
            print(f"  (unpacked into {tree.parent}; ext4 'used' = blocks allocated, 'file' = the image's length)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    anyio.run(main)
