import os, time
import pytest
from cellvm.sandbox import Sandbox
pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("kvm", "mirrored_registry")]

async def timeit(label, fn, n=200):
    for _ in range(10): await fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter(); await fn(); ts.append(time.perf_counter() - t)
    ts.sort(); print(f"\n{os.environ.get('CELLVM_AGENT','new')} {label}: p50 {ts[n//2]*1e3:.2f} ms p90 {ts[n*9//10]*1e3:.2f} ms")

@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_latency() -> None:
    async with Sandbox("busybox:latest") as s:
        c = s._client
        await timeit("hello", c.hello)
        await timeit("exec true", lambda: c.exec("true"))
        await timeit("read 10MiB", lambda: c.files.read("/dev/zero", length=10<<20), 10)
