"""The guest kernel boots to the test init through cellvm's own VMM: the
64-bit boot protocol (startup_64 with a zero page, the VMM's identity page
tables and CPUID), not QEMU's PVH entry."""

from __future__ import annotations

import json

import pytest

from guestboot import RESULT


@pytest.mark.parametrize("cpus", [1, 2])
def test_boot_through_cellvm_vmm(kvm, vmlinux, testinit, cpus):
    from cellvm import guest
    from cellvm.machine import Machine

    cmdline = f"console=ttyS0 quiet reboot=k panic=-1 poweroff_port=0xf4 cellvm.cpus={cpus} {guest.THP_ANON} {guest.FAULT_AROUND}"
    with Machine(memory_mib=256, vcpus=cpus) as machine:
        machine.load_linux(vmlinux, testinit, cmdline)
        machine.start()
        stopped = machine.wait(60)
        console = machine.core.console()
    if isinstance(console, (bytes, bytearray)):
        console = console.decode(errors="replace")
    tail = "\n".join(console.splitlines()[-40:])
    m = RESULT.search(console)
    assert m and m.group(1) == "PASS", f"no PASS line (wait returned {stopped}):\n{tail}"
    assert stopped is not None, f"power-off did not end the VM:\n{tail}"
    assert json.loads("{" + m.group(2).strip()[1:-1] + "}")["cpus"] == cpus
