"""The README demo: real images in hardware-isolated microVMs, restored
from snapshots, step by step with timings.

No internet here, so it first starts a local registry (Debian's
docker-registry) with the test images and points the mirror setting at it:
the names `node:24` and `python:3.11` then work unchanged, as they would
against Docker Hub.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import anyio

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from support.registry import push_test_images, start_registry  # noqa: E402

from cellvm import _core  # noqa: E402
from cellvm.sandbox import Sandbox  # noqa: E402


def ms(started: float) -> str:
    return f"{1000 * (time.perf_counter() - started):8.1f} ms"


async def run(image: str, *argv: str) -> None:
    started = time.perf_counter()
    async with Sandbox(image) as s:
        ready = ms(started)
        t = time.perf_counter()
        r = await s.exec(*argv)
        print(f"  {image:<16} sandbox ready {ready}, exec {ms(t)}: {r.stdout.strip()!r} (exit {r.exit_code})")
        if r.exit_code != 0:
            print(r.stderr, file=sys.stderr)
            raise SystemExit(1)


async def main() -> None:
    info = _core.hypervisor_info()
    print(f"hypervisor: /dev/kvm is {info['backend']!r}")
    with start_registry() as registry:
        await push_test_images(registry)
        os.environ.update(registry.mirror_env())
        print(f"local registry {registry.url} (docker.io mirrored to it)")
        print("first use of each image pulls it and boots it once to a snapshot; then every sandbox is a restore:")
        for _ in range(2):
            await run("node:24", "node", "-e", "console.log(40 + 2)")
        for _ in range(2):
            await run("python:3.11", "python3", "-c", "print(6 * 7)")
        await run("busybox:latest", "sh", "-c", "echo $(nproc) cpu, $(cat /proc/meminfo | head -1)")
    print("ok")


if __name__ == "__main__":
    anyio.run(main)
