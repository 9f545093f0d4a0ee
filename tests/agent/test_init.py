"""The agent as PID 1, on the host: PID 1 of a new PID and mount namespace,
chrooted into an "initramfs" directory, with an EROFS image on a loop device
as cellvm.root. This runs the real init path (mounts, overlay, root switch,
image config, reaping, fatal power-off) without a VM; the protocol runs on
an inherited socket instead of /dev/hvc0 (--fd with --init)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketStream

from cellvm.agent import AgentClient
from support.agent_host import AgentProcess

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

BUSYBOX = Path("/bin/busybox")
APPLETS = "sh echo cat id ls pwd sleep hostname tty true env".split()
CONFIG = {"env": ["PATH=/bin", "IMAGE_VAR=from the image"], "workdir": ["/etc"], "hostname": ["cellvm-test"]}


def init_problem() -> str | None:
    if os.geteuid() != 0:
        return "PID 1 tests need root (mounts, loop devices, namespaces)"
    for tool in ("unshare", "mkfs.erofs", "losetup"):
        if not shutil.which(tool):
            return f"{tool} is not installed"
    if not BUSYBOX.exists():
        return f"{BUSYBOX} is missing (apt-get install busybox-static)"
    return None


@pytest.fixture(scope="session")
def image_device(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A tiny image root (static busybox, passwd) as EROFS on a read-only loop device."""
    problem = init_problem()
    if problem:
        pytest.skip(problem)
    base = tmp_path_factory.mktemp("image")
    rootfs = base / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    (rootfs / "etc").mkdir()
    shutil.copy(BUSYBOX, rootfs / "bin" / "busybox")
    for applet in APPLETS:
        (rootfs / "bin" / applet).symlink_to("busybox")
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
    (rootfs / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    image = base / "rootfs.erofs"
    subprocess.run(["mkfs.erofs", "--quiet", str(image), str(rootfs)], check=True)
    device = subprocess.run(
        ["losetup", "--find", "--show", "--read-only", str(image)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["losetup", "--detach", device], check=False)


async def start_pid1(agent_binary: Path, directory: Path, cmdline: str) -> tuple[AgentProcess, SocketStream]:
    initramfs = directory / "initramfs"
    (initramfs / "dev").mkdir(parents=True)
    (initramfs / "cellvm").mkdir()
    shutil.copy(agent_binary, initramfs / "init")
    records = [f"{key}={value}".encode() for key, values in CONFIG.items() for value in values]
    (initramfs / "cellvm" / "config").write_bytes(b"".join(r + b"\0" for r in records))
    ours, theirs = socket.socketpair()
    log_path = directory / "agent.log"
    with theirs, open(log_path, "ab") as log:
        process = await anyio.open_process(
            # --uts and --net: the agent sets the hostname and brings up lo,
            # which must not touch the host's
            ["unshare", "--mount", "--pid", "--uts", "--net", "--fork", f"--root={initramfs}",
             "/init", "--init", "--fd", str(theirs.fileno()), "--cmdline", cmdline],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=[theirs.fileno()],
        )  # fmt: skip
    return AgentProcess(process, log_path), await SocketStream.from_socket(ours)


@pytest.fixture
async def pid1_agent(agent_binary: Path, image_device: str, tmp_path: Path) -> AsyncIterator[AgentClient]:
    process, stream = await start_pid1(
        agent_binary, tmp_path, f"console=ttyS0 cellvm.root={image_device} cellvm.rootfstype=erofs"
    )
    try:
        async with AgentClient(stream) as client:
            with anyio.fail_after(20):
                await client.wait_ready()
            yield client
    finally:
        await stream.aclose()
        # Closing the channel makes PID 1 power off: in a PID namespace
        # reboot() ends the namespace's init with SIGHUP.
        with anyio.fail_after(20):
            await process.process.wait()
        assert "cellvm-agent: fatal: the host closed fd" in process.log(), process.log()
        assert "ignoring" not in process.log(), process.log()
        await process.process.aclose()


async def test_pid1_sets_up_the_machine(pid1_agent: AgentClient) -> None:
    info = await pid1_agent.hello()
    assert info.init and info.pid == 1
    mounts = {
        (line.split()[1], line.split()[2])
        for line in (await pid1_agent.files.read("/proc/mounts")).decode().splitlines()
    }
    for expected in [("/", "overlay"), ("/dev", "devtmpfs"), ("/proc", "proc"), ("/sys", "sysfs"),
                     ("/dev/pts", "devpts"), ("/dev/shm", "tmpfs"), ("/tmp", "tmpfs")]:  # fmt: skip
        assert expected in mounts, mounts
    result = await pid1_agent.exec("sh", "-c", 'echo "$IMAGE_VAR|$PATH|$(pwd)|$(hostname)|$(id -u)|$(ulimit -n)"')
    *fields, open_files = result.stdout.decode().strip().split("|")
    assert fields == ["from the image", "/bin", "/etc", "cellvm-test", "0"]
    assert int(open_files) > 1024  # docker's 1048576 where the kernel allows it
    lo_flags = int((await pid1_agent.files.read("/sys/class/net/lo/flags")).decode(), 16)
    assert lo_flags & 0x1, "lo is not up"  # IFF_UP
    assert ("/sys/fs/cgroup", "cgroup2") in mounts


async def test_root_is_a_writable_overlay_of_the_image(pid1_agent: AgentClient) -> None:
    assert (await pid1_agent.files.stat("/bin/busybox")).size == BUSYBOX.stat().st_size
    await pid1_agent.files.write("/etc/written-in-the-vm", b"upper layer")
    assert await pid1_agent.files.read("/etc/written-in-the-vm") == b"upper layer"
    await pid1_agent.files.remove("/bin/tty")  # a whiteout over the read-only image
    assert not await pid1_agent.files.exists("/bin/tty")


async def test_users_come_from_the_image(pid1_agent: AgentClient) -> None:
    result = await pid1_agent.exec("id", user="nobody")
    assert result.stdout.startswith(b"uid=65534(nobody) gid=65534(nogroup)")


async def test_pty_on_the_machines_devpts(pid1_agent: AgentClient) -> None:
    result = await pid1_agent.exec("tty", pty=True)
    assert result.stdout.startswith(b"/dev/pts/")


async def test_pid1_reaps_orphans(pid1_agent: AgentClient) -> None:
    await pid1_agent.exec("sh", "-c", "(sleep 0.1 </dev/null >/dev/null 2>&1 &); true")
    with anyio.fail_after(10):
        while True:
            states = await pid1_agent.exec("sh", "-c", "cat /proc/[0-9]*/stat")
            if b") Z " not in states.stdout and b"sleep" not in states.stdout:
                break
            await anyio.sleep(0.05)


async def test_fatal_error_powers_off(agent_binary: Path, image_device: str, tmp_path: Path) -> None:
    if init_problem():
        pytest.skip(init_problem() or "")
    # An EROFS image mounted as ext4 fails at once.
    process, stream = await start_pid1(agent_binary, tmp_path, f"cellvm.root={image_device} cellvm.rootfstype=ext4")
    with anyio.fail_after(20):
        await process.process.wait()
    await stream.aclose()
    await process.process.aclose()
    log = process.log()
    assert log.startswith("cellvm-agent: fatal: mount"), log
    assert len(log.splitlines()) == 1, log
