"""Boot harness for the guest-kernel tests: QEMU microvm, interim until the
cellvm VMM boots the kernel itself.

The kernel and the test initramfs come from the kernel stage
(scripts/stages/20-kernel.sh): $CELLVM_KERNEL or
$CELLVM_CACHE/kernel/vmlinux, and $CELLVM_TESTINIT or
$CELLVM_CACHE/kernel/testinit.cpio.gz. A missing file is a failure, not a
skip: the stage is part of every set-up.

Every boot has a deadline; a guest that misses it is killed and the test
fails with the console tail.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("CELLVM_CACHE", Path.home() / ".cache" / "cellvm"))

# QEMU's isa-debug-exit at this port ends QEMU with status (value << 1) | 1;
# the kernel's poweroff_port= writes 0 there on power-off.
POWEROFF_PORT = 0xF4
POWEROFF_STATUS = 1
RESULT = re.compile(r"^CELLVM-TESTINIT: (PASS|FAIL) ?(.*)$", re.M)


def artifact(env: str, default: Path, what: str) -> Path:
    path = Path(os.environ.get(env) or default)
    if not path.exists():
        pytest.fail(
            f"{what} not found at {path} (set {env}, or build it with "
            "scripts/stages/20-kernel.sh)",
            pytrace=False,
        )
    return path.resolve()


def kernel_symbols(vmlinux: Path, names: list[str]) -> dict[str, int]:
    """Addresses from the System.map stored next to the cached vmlinux."""
    found: dict[str, int] = {}
    system_map = vmlinux.parent / "System.map"
    if system_map.exists():
        for line in system_map.read_text().splitlines():
            addr, _, name = line.split(maxsplit=2)
            if name in names:
                found[name] = int(addr, 16)
    return found


@dataclasses.dataclass
class Boot:
    console: str
    returncode: int | None  # None: killed at the deadline
    result: str | None  # "PASS" / "FAIL" / None
    detail: str

    @property
    def json(self) -> dict:
        return json.loads("{" + self.detail.strip()[1:-1] + "}")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.console.splitlines()[-lines:])


def boot(
    qemu: str,
    vmlinux: Path,
    initrd: Path,
    *,
    cpus: int = 1,
    accel: str = "kvm",
    append: str = "",
    timeout: float = 60,
) -> Boot:
    if accel == "kvm":
        # The vCPU's CPUID is the host's (kvm-pvm answers plain CPUID from
        # the outer hypervisor anyway); arch-capabilities is not emulated.
        machine, cpu = "pit=off,pic=off,rtc=off", ["-enable-kvm", "-cpu", "max,-arch-capabilities"]
    else:
        # No kvmclock under TCG: the PIT and RTC give the kernel a time base.
        machine, cpu = "pit=on,pic=on,rtc=on", ["-accel", "tcg", "-cpu", "max"]
    cmdline = (
        f"console=ttyS0 reboot=t panic=-1 poweroff_port={POWEROFF_PORT:#x} "
        f"cellvm.cpus={cpus} {append}"
    )
    argv = [
        qemu, "-M", f"microvm,x-option-roms=off,isa-serial=on,{machine}", *cpu,
        "-m", "256", "-smp", str(cpus), "-nodefaults", "-no-user-config",
        "-display", "none", "-serial", "stdio", "-no-reboot",
        "-device", f"isa-debug-exit,iobase={POWEROFF_PORT:#x},iosize=4",
        "-kernel", str(vmlinux), "-initrd", str(initrd), "-append", cmdline,
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
        returncode: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        returncode = None
    console = out.decode(errors="replace").replace("\r\n", "\n")
    m = RESULT.search(console)
    return Boot(console, returncode, m.group(1) if m else None, m.group(2) if m else "")


def assert_passed(b: Boot) -> None:
    if b.result != "PASS":
        what = "missed its deadline" if b.returncode is None else f"ended with status {b.returncode}"
        pytest.fail(
            f"guest did not pass ({b.result or 'no result line'}; QEMU {what}):\n{b.tail()}",
            pytrace=False,
        )
    assert b.returncode == POWEROFF_STATUS, f"power-off did not end the VM:\n{b.tail()}"
