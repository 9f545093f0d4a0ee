"""`async with Sandbox(image) as s`: commands, streams, files, snapshots and
failures, on real VMs (nothing mocked)."""

from __future__ import annotations

import hashlib
import os
import time

import anyio
import pytest

from cellvm import CellvmError, _core, sandbox
from cellvm.errors import CommandNotFound, ExecTimeout, SandboxCrashed
from cellvm.machine import Machine
from cellvm.sandbox import Sandbox

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("kvm", "mirrored_registry")]

BUSYBOX = "busybox:latest"


async def test_echo_exit_codes_and_stderr() -> None:
    async with Sandbox(BUSYBOX) as s:
        r = await s.exec("echo", "hello")
        assert (r.exit_code, r.stdout, r.stderr) == (0, "hello\n", "")
        r = await s.exec("sh", "-c", "echo oops >&2; exit 3")
        assert (r.exit_code, r.stdout, r.stderr) == (3, "", "oops\n")


async def test_env_cwd_user_and_stdin() -> None:
    async with Sandbox(BUSYBOX, env={"GREETING": "hi"}) as s:
        r = await s.exec("sh", "-c", "echo $GREETING $EXTRA", env={"EXTRA": "there"})
        assert r.stdout == "hi there\n"
        assert (await s.exec("pwd", cwd="/tmp")).stdout == "/tmp\n"
        assert (await s.exec("id", "-u", user="nobody")).stdout.strip() == "65534"
        assert (await s.exec("id", "-u")).stdout.strip() == "0"
        assert (await s.exec("cat", stdin="from the host")).stdout == "from the host"


async def test_ten_mib_of_stdout_arrives_intact() -> None:
    async with Sandbox(BUSYBOX) as s:
        r = await s.exec("sh", "-c", "head -c 10485760 /dev/urandom | tee /tmp/data | sha256sum")
        expected = r.stdout.split()[0]
        r = await s.exec("cat", "/tmp/data")
        assert len(r.stdout_bytes) == 10 << 20
        assert hashlib.sha256(r.stdout_bytes).hexdigest() == expected


async def test_missing_binary_and_timeout() -> None:
    async with Sandbox(BUSYBOX) as s:
        with pytest.raises(CommandNotFound):
            await s.exec("no-such-program")
        with pytest.raises(ExecTimeout):
            await s.exec("sleep", "30", timeout=0.5)
        assert (await s.exec("echo", "still here")).stdout == "still here\n"


async def test_twenty_concurrent_execs() -> None:
    async with Sandbox(BUSYBOX) as s:
        results: dict[int, str] = {}

        async def run(i: int) -> None:
            results[i] = (await s.exec("sh", "-c", f"sleep 0.1; echo {i}")).stdout

        async with anyio.create_task_group() as tasks:
            for i in range(20):
                tasks.start_soon(run, i)
        assert results == {i: f"{i}\n" for i in range(20)}


async def test_cpus() -> None:
    async with Sandbox(BUSYBOX, cpus=2) as s:
        assert (await s.exec("nproc")).stdout == "2\n"


async def test_files_round_trip() -> None:
    async with Sandbox(BUSYBOX) as s:
        payload = os.urandom(300_000)
        await s.files.mkdir("/work/sub", parents=True)
        await s.files.write("/work/sub/blob.bin", payload)
        assert await s.files.read("/work/sub/blob.bin") == payload
        names = [entry.name for entry in await s.files.list("/work/sub")]
        assert names == ["blob.bin"]
        assert (await s.files.stat("/work/sub/blob.bin")).size == len(payload)
        assert (await s.exec("sha256sum", "/work/sub/blob.bin")).stdout.split()[0] == hashlib.sha256(payload).hexdigest()
        await s.files.remove("/work", recursive=True)
        assert (await s.exec("ls", "/work")).exit_code != 0


async def test_process_streams() -> None:
    async with Sandbox(BUSYBOX) as s:
        async with s.process("sh", "-c", "while read line; do echo got $line; done", stdin=True) as p:
            await p.stdin.send(b"one\ntwo\n")
            await p.stdin.close()
            out = b""
            async for chunk in p:
                out += chunk.data
            status = await p.wait()
        assert out == b"got one\ngot two\n" and status.exit_code == 0


async def test_snapshot_keeps_files_and_processes(tmp_path) -> None:
    async with Sandbox(BUSYBOX) as s:
        await s.exec("sh", "-c", "echo saved > /root/state")
        await s.exec("sh", "-c", "(i=0; while true; do i=$((i+1)); echo $i > /tmp/ticks; sleep 0.05; done) >/dev/null 2>&1 &")
        await anyio.sleep(0.3)
        snapshot = await s.snapshot(tmp_path / "snap")
    async with Sandbox.from_snapshot(snapshot) as restored:
        assert (await restored.exec("cat", "/root/state")).stdout == "saved\n"
        first = int((await restored.exec("cat", "/tmp/ticks")).stdout)
        await anyio.sleep(0.3)
        assert int((await restored.exec("cat", "/tmp/ticks")).stdout) > first


async def test_restores_do_not_share_randomness(tmp_path) -> None:
    async with Sandbox(BUSYBOX) as s:
        snapshot = await s.snapshot(tmp_path / "snap")
    seen = set()
    for _ in range(2):
        async with Sandbox.from_snapshot(snapshot) as clone:
            r = await clone.exec("sh", "-c", "head -c 32 /dev/urandom | od -An -tx1; cat /proc/sys/kernel/random/uuid")
            seen.add(r.stdout)
    assert len(seen) == 2


async def test_restored_clock_follows_the_host(tmp_path) -> None:
    async with Sandbox(BUSYBOX) as s:
        snapshot = await s.snapshot(tmp_path / "snap")
    await anyio.sleep(5)
    async with Sandbox.from_snapshot(snapshot) as clone:
        guest_now = float((await clone.exec("date", "+%s")).stdout)
    assert abs(guest_now - time.time()) < 1.5  # `date +%s` truncates to whole seconds


async def test_a_vm_that_dies_gives_sandbox_crashed() -> None:
    async with Sandbox(BUSYBOX) as s:
        with pytest.raises(SandboxCrashed) as info:
            await s.exec("reboot", "-f")
        assert isinstance(info.value, CellvmError)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.skipif(sandbox.PREPARED_MACHINES == 0, reason="CELLVM_SANDBOX_PREPARED=0")
async def test_repeated_use_restores_prepared_machines_with_the_working_set() -> None:
    for _ in range(2):  # from the second sandbox of a template on, machines are prepared
        async with Sandbox(BUSYBOX) as s:
            template = s._source
    assert (template.path.parent / sandbox.WORKING_SET).stat().st_size > 0
    assert Machine.wait_prepared(template, sandbox.PREPARED_MACHINES, timeout=30) == sandbox.PREPARED_MACHINES
    async with Sandbox(BUSYBOX) as s:
        assert "pool_take" in [phase for phase, _ in s.machine.restore_phases()]
        r = await s.exec("sh", "-c", "echo hi; head -c 16 /dev/urandom | wc -c")
        assert (r.exit_code, r.stdout) == (0, "hi\n16\n")


def _footprint() -> tuple[int, int, int]:
    fds = len(os.listdir("/proc/self/fd"))
    threads = len(os.listdir("/proc/self/task"))
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return fds, threads, rss


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_200_sandboxes_leave_no_trace() -> None:
    async def one() -> None:
        async with Sandbox(BUSYBOX) as s:
            assert (await s.exec("true")).exit_code == 0

    def settled() -> tuple[int, int, int]:
        # The machines Sandbox keeps prepared (for this and earlier tests'
        # templates) are refilled in the background: count with every pool
        # entry full, as it is between bursts.
        for e in _core.vm_pool_status():
            _core.vm_pool_wait(e["memory_mib"], e["vcpus"], e["layers"], e["target"], 10.0, state=e["state"])
        return _footprint()

    for _ in range(10):
        await one()
    fds, threads, rss = settled()
    for _ in range(200):
        await one()
    fds_after, threads_after, rss_after = settled()
    # A leak of one fd per sandbox would show 200; a machine the pool is
    # building or closing at either count holds ~5.
    assert fds_after - fds < 20, (fds, fds_after)
    assert threads_after <= threads  # anyio's worker threads may retire, never pile up
    assert rss_after - rss < 32 << 20, f"RSS grew {(rss_after - rss) >> 20} MiB"


def test_blocking_facade(mirrored_registry) -> None:  # noqa: ARG001 - the fixture points docker.io at the registry
    from cellvm.blocking import Sandbox as BlockingSandbox

    with BlockingSandbox(BUSYBOX) as s:
        assert s.exec("echo", "blocking").stdout == "blocking\n"
        s.write_file("/tmp/f", b"x" * 1000)
        assert s.read_file("/tmp/f") == b"x" * 1000
        assert [e.name for e in s.list_dir("/tmp")] == ["f"]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_prune_deletes_only_the_templates_nothing_can_use(tmp_path, monkeypatch) -> None:
    import json
    import shutil

    from cellvm import guest

    monkeypatch.setenv("CELLVM_KERNEL", str(guest.kernel_path()))
    monkeypatch.setenv("CELLVM_AGENT", str(guest.agent_path()))
    monkeypatch.setenv("CELLVM_CACHE", str(tmp_path))  # a cache of this test's own
    async with Sandbox(BUSYBOX) as s:
        # The first restore of a template in a process has no prepared machine:
        # it copies the working set the bake recorded itself.
        assert "working_set" in [phase for phase, _ in s.machine.restore_phases()]
    templates = tmp_path / "templates"
    (current,) = templates.iterdir()
    inputs = json.loads((current / sandbox.TEMPLATE_INPUTS).read_text())
    assert inputs["format"] == sandbox.TEMPLATE_FORMAT and inputs["memory_mib"] == 512
    for name, change in (
        ("old-format", {"format": sandbox.TEMPLATE_FORMAT - 1}),
        ("other-kernel", {"kernel": "0" * 64}),
        ("other-agent", {"agent": "0" * 64}),
        ("rootfs-gone", {"rootfs": str(tmp_path / "pruned.erofs")}),
    ):
        shutil.copytree(current, templates / name)
        (templates / name / sandbox.TEMPLATE_INPUTS).write_text(json.dumps({**inputs, **change}))
    shutil.copytree(current, templates / "before-key-json")
    (templates / "before-key-json" / sandbox.TEMPLATE_INPUTS).unlink()
    busy = templates / "being-baked"
    busy.mkdir()
    lock = sandbox._lock(busy / ".lock")  # as a bake in another process holds it
    try:
        removed, freed = await sandbox.prune_templates()
    finally:
        os.close(lock)
    assert removed == 5 and freed > 5 * 1024 * 1024
    assert sorted(p.name for p in templates.iterdir()) == sorted([current.name, "being-baked"])
    async with Sandbox(BUSYBOX) as s:  # the kept template still serves, without a new bake
        assert s._source.path.parent == current
        assert (await s.exec("echo", "kept")).stdout == "kept\n"
    assert await sandbox.prune_templates() == (1, 0)  # the abandoned directory, once nobody holds it
    Machine.prepare_restores(s._source, 0)  # no machines prepared for a template in this test's cache
