"""The guest kernel boots to the test init and everything it checks passes.

On this host /dev/kvm is kvm-pvm: the KVM boots prove the PVM guest layer
(native kernel mode, isolation, fast paths). The TCG boot proves the same
vmlinux still runs where there is no kvm-pvm (the layer is chosen at boot).
"""

from __future__ import annotations

import pytest

from guestboot import assert_passed, boot, kernel_symbols

# Kernel data and text the isolation probes touch besides the fixed
# addresses the init knows (entry text, direct map, cpu_entry_area, TSS).
PROBE_SYMBOLS = ["start_kernel", "init_task", "jiffies_64", "pvm_native"]


def probe_arg(vmlinux) -> str:
    syms = kernel_symbols(vmlinux, PROBE_SYMBOLS)
    return "cellvm.kaddrs=" + ",".join(f"{n}:{a:x}" for n, a in syms.items()) if syms else ""


@pytest.mark.parametrize("cpus", [1, 2])
def test_boot_kvm(kvm, qemu, vmlinux, testinit, cpus):
    b = boot(qemu, vmlinux, testinit, cpus=cpus, append=f"quiet {probe_arg(vmlinux)}")
    assert_passed(b)
    result = b.json
    assert result["cpus"] == cpus
    assert result["isolation_probes"] >= 14 + 2 * len(PROBE_SYMBOLS) - 2


def test_native_mode_on_kvm_pvm(kvm, qemu, vmlinux, testinit):
    """kvm-pvm reads MSR 0x4b564d11 as "PVM": the kernel must run natively."""
    b = boot(qemu, vmlinux, testinit, append="cellvm.quick=1")
    assert_passed(b)
    assert "pvm: native kernel mode on kvm-pvm" in b.console
    assert "Kernel/User page tables isolation: enabled" in b.console


def test_boot_tcg_without_pvm(qemu, vmlinux, testinit):
    b = boot(qemu, vmlinux, testinit, cpus=2, accel="tcg", append="cellvm.quick=1", timeout=300)
    assert_passed(b)
    assert b.json["cpus"] == 2
    assert "pvm: native kernel mode" not in b.console


def test_busybox_pipeline(kvm, qemu, vmlinux, testinit):
    # '+' stands for a space in cellvm.sh (the kernel command line splits on spaces).
    script = "echo+cellvm-$((6*7))|tr+a-z+A-Z|grep+-x+CELLVM-42"
    b = boot(qemu, vmlinux, testinit, append=f"cellvm.mode=sh cellvm.sh={script}")
    assert_passed(b)
    assert "CELLVM-42" in b.console
