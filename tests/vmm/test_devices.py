"""virtio-mmio devices driven by the test guest's own minimal driver: the
transport, the queue and the checks on what the guest hands the VMM."""

from __future__ import annotations

import struct

import pytest

from cellvm import testguest
from cellvm.machine import Machine
from cellvm.testguest import Mode, VirtioVariant

pytestmark = pytest.mark.usefixtures("kvm")

DRIVER_OK, NEEDS_RESET = 4, 64


def rng_request(variant: VirtioVariant) -> tuple[int, int, int, str]:
    with Machine(memory_mib=64, vcpus=1) as m:
        assert m.add_device("rng") == 0
        m.load_test_guest(testguest.path(), testguest.params(Mode.VIRTIO_RNG, 1, int(variant), native=m.backend == "pvm"))
        m.start()
        assert m.wait(timeout=10) == 0  # the VMM survived whatever the guest asked
        used_len, status, first = struct.unpack("<3Q", m.read_memory(testguest.RESULTS_GPA + 0xD0, 24))
        return used_len, status, first, m.device_cmdline


def test_rng_fills_the_guest_buffer() -> None:
    used_len, status, first, cmdline = rng_request(VirtioVariant.OK)
    assert used_len == 64
    assert status & DRIVER_OK and not status & NEEDS_RESET
    assert first != 0
    assert cmdline == "virtio_mmio.device=4K@0xd0001000:5"


@pytest.mark.parametrize("variant", [VirtioVariant.LOOP, VirtioVariant.OUTSIDE_RAM])
def test_malformed_chains_are_refused(variant: VirtioVariant) -> None:
    used_len, status, first, _ = rng_request(variant)
    assert used_len == (1 << 64) - 1, "the device used a malformed chain"
    assert status & NEEDS_RESET
    assert first == 0


def test_unknown_device_kind_is_rejected() -> None:
    with Machine(memory_mib=64, vcpus=1) as m:
        with pytest.raises(ValueError, match="unknown device kind"):
            m.add_device("floppy")
        with pytest.raises(ValueError, match="cannot open disk image"):
            m.add_device("block", path="/nonexistent.img")
