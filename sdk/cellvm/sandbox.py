"""Sandbox: an image name in, a hardware-isolated Linux machine out, ready in
milliseconds because it is restored, not booted.

    async with Sandbox("node:24") as s:
        r = await s.exec("node", "-e", "console.log(40 + 2)")
        assert r.stdout == "42\\n"

The first Sandbox of an image (for a given kernel, agent and VM shape) boots
it once and saves a snapshot at agent-ready: the *template*. Every later
Sandbox restores the template: a new VM continuing from that instant, with
its own copy-on-write memory, then tells the agent it was restored (fresh
entropy, the host's wall clock) before the first command.

Restores are fast because of what is done ahead (BENCHMARKS.md, "Sandbox"):
the bake also records the template's *working set*, the guest pages one
restore touched up to the end of its first command (outside 2 MiB blocks the
host maps whole); and from its second Sandbox of a template on, a process
keeps PREPARED_MACHINES machines ready in the VM pool
(Machine.prepare_restores), each with the template's memory mapped and that
working set already copied, so a restore neither creates a VM nor takes a
copy-on-write fault for the pages a guest touches first. The first Sandbox
of a template in a process copies the working set on its own restore path.

Templates live in ~/.cache/cellvm/templates/<key>/, each with the inputs of
its key (key.json); `cellvm prune` (prune_templates) deletes the ones the
installed kernel and agent can no longer use.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import SocketStream

from cellvm import guest
from cellvm.agent import AgentClient, AgentFiles, ExecResult, Process
from cellvm.errors import (
    AgentDisconnected,
    AgentError,
    BootFailed,
    CellvmError,
    CommandNotFound,
    GuestCrashed,
    GuestNotBuilt,
    SandboxCrashed,
)
from cellvm.images import Image, pull
from cellvm.machine import Machine
from cellvm.snapshot import Snapshot

#: Bumped when what a template contains changes meaning.
# 2: with a working set; 3: warmed up before the snapshot; 4, 5: the working
# set is the pages written; 6: idle at the snapshot; 7: + pages read in written
# 2 MiB blocks, the image read back in 2 MiB folios; 8: key.json.
TEMPLATE_FORMAT = 8
CONSOLE_DEVICE = 0  # the agent channel is the first device: /dev/hvc0
RESTORE_TIMEOUT = 2.0  # seconds for every vCPU to take its state
BAKE_ATTEMPTS = 3  # a template that does not restore is baked again (template_for)
#: Machines kept prepared per template (CELLVM_SANDBOX_PREPARED; 0: none).
PREPARED_MACHINES = int(os.environ.get("CELLVM_SANDBOX_PREPARED", "2"))
WORKING_SET = "working-set.bin"  # in a template's directory, next to snapshot/
TEMPLATE_INPUTS = "key.json"  # in a template's directory: what its key hashes


@dataclass(frozen=True)
class CompletedProcess:
    """What exec() returns. ``stdout``/``stderr`` are text (UTF-8, with
    replacement); the exact bytes are in ``stdout_bytes``/``stderr_bytes``."""

    exit_code: int
    stdout_bytes: bytes
    stderr_bytes: bytes
    signal: int | None = None

    @property
    def stdout(self) -> str:
        return self.stdout_bytes.decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        return self.stderr_bytes.decode("utf-8", "replace")

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @classmethod
    def _from(cls, result: ExecResult) -> CompletedProcess:
        return cls(result.exit_code, result.stdout, result.stderr, result.signal)


# ---------------------------------------------------------------- templates

_digest_cache: dict[tuple[str, int, int], str] = {}


def _digest(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size)
    if key not in _digest_cache:
        _digest_cache[key] = guest.file_digest(path)
    return _digest_cache[key]


def template_key(image: Image, *, cpus: int, memory_mib: int, kernel: Path, agent: Path) -> str:
    inputs = template_inputs(image, cpus=cpus, memory_mib=memory_mib, kernel=kernel, agent=agent)
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]


def template_inputs(image: Image, *, cpus: int, memory_mib: int, kernel: Path, agent: Path) -> dict[str, Any]:
    return {
        "format": TEMPLATE_FORMAT,
        "kernel": _digest(kernel),
        "agent": _digest(agent),
        "image": image.digest,
        "rootfs": str(image.rootfs),
        "rootfs_format": image.rootfs_format,
        # The guest's command line: a changed one must not reuse old templates.
        "cmdline": guest.kernel_cmdline(rootfs_format=image.rootfs_format),
        "config": image.config.to_json(),
        "cpus": cpus,
        "memory_mib": memory_mib,
    }


def _run_config(image: Image) -> guest.RunConfig:
    config = image.config
    return guest.RunConfig(env=dict(config.env), workdir=config.working_dir or "/", user=config.user_spec or "0:0")


async def _wait_for_agent(machine: Machine, agent: AgentClient, timeout: float) -> None:
    """READY from a booting agent, or BootFailed with the console tail if the
    machine stops (panic, bad init) or the deadline passes."""
    async with anyio.create_task_group() as tasks:
        result: list[BaseException] = []

        async def watch() -> None:
            while not machine.stopped:
                await anyio.sleep(0.01)
            result.append(BootFailed("the guest stopped before its agent was ready", console=_console(machine)))
            tasks.cancel_scope.cancel()

        tasks.start_soon(watch)
        with anyio.move_on_after(timeout) as deadline:
            await agent.wait_ready()
        tasks.cancel_scope.cancel()
    if result:
        raise result[0]
    if deadline.cancelled_caught:
        raise BootFailed(f"the guest agent was not ready after {timeout} s", console=_console(machine))


def _console(machine: Machine) -> str:
    return machine.console().decode("utf-8", "replace")


async def _bake(image: Image, directory: Path, *, cpus: int, memory_mib: int, boot_timeout: float) -> Snapshot:
    kernel, agent_binary = guest.kernel_path(), guest.agent_path()
    inputs = template_inputs(image, cpus=cpus, memory_mib=memory_mib, kernel=kernel, agent=agent_binary)
    await anyio.Path(directory / TEMPLATE_INPUTS).write_text(json.dumps(inputs, indent=1, sort_keys=True))
    initramfs = directory / "initramfs.cpio.gz"
    await anyio.to_thread.run_sync(guest.build_initramfs, agent_binary, _run_config(image), initramfs)
    machine = Machine(memory_mib=memory_mib, vcpus=cpus)
    try:
        assert machine.add_device("console") == CONSOLE_DEVICE
        machine.add_device("block", path=image.rootfs, read_only=True)
        machine.add_device("rng")
        cmdline = guest.kernel_cmdline(rootfs_format=image.rootfs_format)
        machine.load_linux(kernel, initramfs, cmdline)
        machine.start()
        stream = await SocketStream.from_socket(machine.console_socket(CONSOLE_DEVICE))
        async with AgentClient(stream) as agent:
            await _wait_for_agent(machine, agent, boot_timeout)
            await _warm_up(agent)
            snapshot = await anyio.to_thread.run_sync(
                lambda: machine.snapshot(directory / "snapshot", resume=False)
            )
    finally:
        await anyio.to_thread.run_sync(machine.close)
    try:
        # Also the template's proof: one restore must run a command.
        await _record_working_set(snapshot, directory / WORKING_SET)
    except BaseException:
        snapshot.remove()  # never leave a template that does not restore
        raise
    return snapshot


async def _warm_up(agent: AgentClient) -> None:
    """One command before the snapshot, so every restore starts with the
    exec path warm: the image's `true` and libc in the page cache (no disk
    reads), the kernel's caches for a new process filled. Restore to the
    first byte of `echo hi` 28 -> 21 ms (interleaved A/B, 12 runs). An image
    without `true` is baked as it is."""
    try:
        await agent.exec("true", timeout=10)
    except CellvmError:
        pass
    # Let the guest go idle (the child's exit, RCU, deferred work) before the
    # snapshot: a 2-vCPU template snapshotted while its second vCPU was busy
    # has restored into a fault at its PV IPI hypercall (__send_ipi_mask:
    # native #UD, "emul FAILED" in dmesg).
    await anyio.sleep(0.05)


async def _record_working_set(snapshot: Snapshot, path: Path) -> None:
    """Restore the new template once, as a Sandbox does, run a command with
    output (`echo`, else `true`), and keep the guest pages it touched,
    outside 2 MiB blocks it read whole, in `path`
    (Machine.write_working_set): prepared machines copy them ahead (busybox:
    ~4,700 pages, 18 MiB per machine), so KVM maps 8 of them per shadow
    fault. A command that prints covers the output path too: 710 -> 580
    shadow faults to the first byte of `echo hi` against `true`."""
    machine = await anyio.to_thread.run_sync(lambda: Machine.restore(snapshot, timeout=RESTORE_TIMEOUT))
    try:
        stream = await SocketStream.from_socket(machine.console_socket(CONSOLE_DEVICE))
        async with AgentClient(stream) as agent:
            await agent.restored(os.urandom(64), time.time_ns())
            try:
                await agent.exec("echo", "cellvm", timeout=10)
            except CommandNotFound:
                try:
                    await agent.exec("true", timeout=10)
                except CommandNotFound:
                    pass  # an image with neither: the RESTORED round trip was the proof
            partial = path.with_suffix(".partial")
            await anyio.to_thread.run_sync(machine.write_working_set, str(partial))
            partial.rename(path)
    finally:
        await anyio.to_thread.run_sync(machine.close)


_restores: dict[Path, int] = {}  # template -> Sandboxes started from it in this process


def _keep_prepared(template: Snapshot) -> None:
    """From the second Sandbox of a template in this process on, keep
    PREPARED_MACHINES machines ready for its restores (the pool's worker
    builds them in the background). Not for the first: a process that runs
    one sandbox (`cellvm run`) would build machines it never uses, on the
    CPUs its own restore needs."""
    _restores[template.path] = count = _restores.get(template.path, 0) + 1
    if PREPARED_MACHINES <= 0 or count != 2:
        return
    working_set = template.path.parent / WORKING_SET
    Machine.prepare_restores(
        template, PREPARED_MACHINES, working_set=working_set if working_set.exists() else None
    )


async def template_for(image: Image, *, cpus: int, memory_mib: int, boot_timeout: float = 30.0) -> Snapshot:
    """The image's agent-ready snapshot for this shape: cached on disk, built
    once (other processes wait on a lock rather than boot it twice)."""
    kernel, agent = guest.kernel_path(), guest.agent_path()

    def key_of() -> str:
        return template_key(image, cpus=cpus, memory_mib=memory_mib, kernel=kernel, agent=agent)

    if _digests_known(kernel, agent):
        key = key_of()  # ~0.1 ms: cheaper than a trip to a worker thread and back
    else:
        key = await anyio.to_thread.run_sync(key_of)  # hashes the kernel and the agent
    directory = guest.cache_dir() / "templates" / key
    if (template := _templates.get(directory)) is not None and (directory / "snapshot" / "metadata.json").exists():
        return template  # the same object every time: its restore paths are worked out once
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / "snapshot" / "metadata.json").exists():
        template = _templates[directory] = Snapshot.open(directory / "snapshot")
        return template
    lock = await anyio.to_thread.run_sync(_lock, directory / ".lock")
    try:
        if (directory / "snapshot" / "metadata.json").exists():
            return Snapshot.open(directory / "snapshot")
        for attempt in range(1, BAKE_ATTEMPTS + 1):
            try:
                return await _bake(image, directory, cpus=cpus, memory_mib=memory_mib, boot_timeout=boot_timeout)
            except (AgentError, GuestCrashed, SandboxCrashed) as error:
                # A template whose first restore crashed: on this host a 2-vCPU
                # template caught at a bad instant has restored into a fault at
                # the guest's PV IPI hypercall (kvm-pvm "native #UD" in
                # __send_ipi_mask). Bake it again rather than keep it.
                if attempt == BAKE_ATTEMPTS:
                    raise BootFailed(
                        f"the template of {image.name} did not restore after {attempt} bakes: {error}"
                    ) from error
        raise AssertionError("unreachable")
    finally:
        os.close(lock)


_templates: dict[Path, Snapshot] = {}  # template directory -> its snapshot (directories are immutable)


async def prune_templates() -> tuple[int, int]:
    """Delete the sandbox templates nothing can restore any more: made for
    another template format, kernel or agent than the installed ones (or
    before templates recorded their inputs), or whose image root filesystem
    is gone (`cellvm prune` deleted it). Returns (templates removed, bytes
    freed). A template being baked right now (locked) is left alone;
    machines restored from a deleted template keep running (their memory
    image stays until they close)."""
    return await anyio.to_thread.run_sync(_prune_templates_blocking, guest.cache_dir() / "templates")


def _prune_templates_blocking(root: Path) -> tuple[int, int]:
    current: dict[str, str] = {"format": str(TEMPLATE_FORMAT)}
    for name, path_of in (("kernel", guest.kernel_path), ("agent", guest.agent_path)):
        try:
            current[name] = _digest(path_of())
        except GuestNotBuilt:
            pass  # nothing installed to compare with: this input does not make a template stale
    removed = freed = 0
    for directory in sorted(root.iterdir()) if root.is_dir() else ():
        if not directory.is_dir() or not _template_stale(directory, current):
            continue
        try:
            lock = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            continue  # removed by someone else meanwhile
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a bake holds it
            size = sum(p.lstat().st_blocks * 512 for p in directory.rglob("*"))  # memory images are sparse
            shutil.rmtree(directory, ignore_errors=True)
        finally:
            os.close(lock)
        _templates.pop(directory, None)
        removed, freed = removed + 1, freed + size
    return removed, freed


def _template_stale(directory: Path, current: dict[str, str]) -> bool:
    try:
        inputs = json.loads((directory / TEMPLATE_INPUTS).read_text())
    except (OSError, ValueError):
        return True  # from before templates recorded their inputs, or torn
    if not isinstance(inputs, dict) or str(inputs.get("format")) != current["format"]:
        return True
    if any(inputs.get(name) != current[name] for name in ("kernel", "agent") if name in current):
        return True
    return not Path(str(inputs.get("rootfs", ""))).exists()


def _digests_known(*paths: Path) -> bool:
    for path in paths:
        st = path.stat()
        if (str(path), st.st_mtime_ns, st.st_size) not in _digest_cache:
            return False
    return True


def _lock(path: Path) -> int:
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_nlink > 0:
            return fd
        os.close(fd)  # prune_templates deleted the directory while we waited: lock the new one


# ---------------------------------------------------------------- the sandbox


class Sandbox:
    """A microVM running an OCI image, restored from the image's template.

    Options are keyword-only and need no flags for the common case: ``cpus``
    and ``memory_mib`` shape the VM; ``env``, ``workdir`` and ``user`` are
    defaults for every command (on top of the image's Env, WorkingDir, User).
    """

    def __init__(
        self,
        image: str | Image,
        *,
        cpus: int = 1,
        memory_mib: int = 512,
        env: Mapping[str, str] | None = None,
        workdir: str | None = None,
        user: str | None = None,
        boot_timeout: float = 30.0,
    ) -> None:
        self.image = image
        self.cpus = cpus
        self.memory_mib = memory_mib
        self.env = dict(env or {})
        self.workdir = workdir
        self.user = user
        self.boot_timeout = boot_timeout
        self._source: Snapshot | None = None
        self._machine: Machine | None = None
        self._agent: AgentClient | None = None

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Sandbox:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        if self._machine is not None:
            raise CellvmError("the sandbox is already started")
        working_set = None
        if self._source is None:
            image = self.image if isinstance(self.image, Image) else await pull(self.image)
            self.image = image
            self._source = await template_for(
                image, cpus=self.cpus, memory_mib=self.memory_mib, boot_timeout=self.boot_timeout
            )
            _keep_prepared(self._source)
            working_set = self._source.path.parent / WORKING_SET
        await self._restore(self._source, working_set)

    async def _restore(self, snapshot: Snapshot, working_set: Path | None = None) -> None:
        # A template's working set is copied ahead when no prepared machine
        # serves the restore (the first Sandbox of a template in a process).
        def restore() -> Machine:
            ws = working_set if working_set is not None and working_set.exists() else None
            return Machine.restore(snapshot, timeout=RESTORE_TIMEOUT, working_set=ws)

        machine = await anyio.to_thread.run_sync(restore)
        try:
            stream = await SocketStream.from_socket(machine.console_socket(CONSOLE_DEVICE))
            agent = AgentClient(stream)
            await agent.__aenter__()
        except BaseException:
            await anyio.to_thread.run_sync(machine.close)
            raise
        self._machine, self._agent = machine, agent
        try:
            # Before anything else runs: clones of one template must not share
            # random numbers, and the template's clock is from when it was baked.
            await agent.restored(os.urandom(64), time.time_ns())
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        agent, machine = self._agent, self._machine
        self._agent = self._machine = None
        try:
            if agent is not None:
                # Not under a shield: the agent's task group must be the
                # innermost cancel scope when it exits (structured concurrency).
                await agent.__aexit__(None, None, None)
        finally:
            if machine is not None:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(machine.close)

    @property
    def machine(self) -> Machine:
        if self._machine is None:
            raise CellvmError("the sandbox is not started (use `async with Sandbox(...)`)")
        return self._machine

    @property
    def _client(self) -> AgentClient:
        if self._agent is None:
            raise CellvmError("the sandbox is not started (use `async with Sandbox(...)`)")
        return self._agent

    def console(self) -> str:
        """The guest's serial console so far (kernel messages, agent errors)."""
        return _console(self.machine)

    # ------------------------------------------------------------ commands

    def _defaults(self, env: Mapping[str, str] | None, cwd: str | None, user: str | None) -> dict[str, Any]:
        merged = {**self.env, **(env or {})}
        return {"env": merged or None, "cwd": cwd or self.workdir, "user": user or self.user}

    async def exec(
        self,
        *argv: str,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        stdin: bytes | str | None = None,
        timeout: float | None = None,
    ) -> CompletedProcess:
        """Run a command to completion. A non-zero exit is a result; a missing
        program raises CommandNotFound, a timeout ExecTimeout (the sandbox
        stays usable), a VM that died SandboxCrashed."""
        data = stdin.encode() if isinstance(stdin, str) else stdin
        async with self._crash_as_error():
            result = await self._client.exec(*argv, stdin=data, timeout=timeout, **self._defaults(env, cwd, user))
        return CompletedProcess._from(result)

    @asynccontextmanager
    async def process(
        self,
        *argv: str,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        stdin: bool = False,
        pty: bool = False,
        rows: int = 24,
        cols: int = 80,
        timeout: float | None = None,
    ) -> AsyncIterator[Process]:
        """Start a command and stream it: ``async for chunk in p`` (chunks of
        stdout/stderr), ``await p.stdin.send(...)``, ``await p.signal(...)``,
        ``await p.wait()``."""
        async with self._crash_as_error():
            async with self._client.process(
                *argv, stdin=stdin, pty=pty, rows=rows, cols=cols, timeout=timeout, **self._defaults(env, cwd, user)
            ) as process:
                yield process

    @property
    def files(self) -> AgentFiles:
        """read / write / list / stat / mkdir / remove in the guest."""
        return self._client.files

    @asynccontextmanager
    async def _crash_as_error(self) -> AsyncIterator[None]:
        try:
            yield
        except AgentDisconnected as e:
            machine = self._machine
            if machine is not None:
                # The channel closes when the VM stops: say why it stopped.
                await anyio.sleep(0.05)
                if machine.stopped:
                    raise SandboxCrashed("the sandbox's VM stopped", console=_console(machine)) from e
            raise

    # ------------------------------------------------------------ snapshots

    async def snapshot(self, path: str | os.PathLike[str] | None = None) -> Snapshot:
        """Save this sandbox (memory, processes, files) as it is now; it keeps
        running. Sandbox.from_snapshot() continues from it, any number of times."""
        machine = self.machine
        return await anyio.to_thread.run_sync(lambda: machine.snapshot(path, resume=True))

    @classmethod
    def from_snapshot(cls, snapshot: Snapshot | str | os.PathLike[str], **options: Any) -> Sandbox:
        """A sandbox that continues from `snapshot` when entered."""
        if not isinstance(snapshot, Snapshot):
            snapshot = Snapshot.open(snapshot)
        sandbox = cls(str(snapshot.path), **options)
        sandbox._source = snapshot
        return sandbox

    async def fork(self, n: int) -> list[Sandbox]:
        """`n` sandboxes that continue from this one's current state (which
        keeps running). Enter each (``async with fork:``) to run it: every
        sandbox owns a task group, so its lifetime is a block, not a call."""
        if n < 1:
            raise ValueError("fork needs n >= 1")
        snapshot = await self.snapshot()
        return [Sandbox.from_snapshot(snapshot, env=self.env, workdir=self.workdir, user=self.user) for _ in range(n)]
