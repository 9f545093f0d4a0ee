"""The README demo: what cellvm does today, step by step, with timings.

1. a microVM with 2 vCPUs runs our counting test guest natively on this
   host's KVM (PVM here), 2. pause and read every vCPU, 3. snapshot it,
   4. restore it into new machines in milliseconds, 5. fork it.
"""

from __future__ import annotations

import time

from cellvm import _core, testguest
from cellvm.machine import Machine
from cellvm.testguest import Mode, read_results


def step(label: str, started: float) -> None:
    print(f"  {label:<46} {1000 * (time.perf_counter() - started):8.2f} ms")


def main() -> None:
    info = _core.hypervisor_info()
    print(f"hypervisor: /dev/kvm backend {info['backend']!r}, {info['cpuid_entries']} CPUID entries")

    t = time.perf_counter()
    machine = Machine(memory_mib=64, vcpus=2)
    step("create VM (memory, irqchip, 2 vCPUs)", t)
    t = time.perf_counter()
    native = machine.backend == "pvm"
    machine.load_test_guest(testguest.path(), testguest.params(Mode.COUNTER, 2, 0, 0, native=native))
    machine.start()
    while not all(read_results(machine.core).counters[:2]):
        time.sleep(0.0005)
    step("load test guest, start, both vCPUs counting", t)
    time.sleep(0.1)

    t = time.perf_counter()
    states = machine.pause()
    step("pause both vCPUs at the barrier", t)
    counts = read_results(machine.core).counters[:2]
    for i, state in enumerate(states):
        assert state is not None
        mode = "native" if state.get("pvm_native", 0) & 0x400 and native else "hardware KVM"
        print(f"    vCPU {i}: rip={state['rip']:#x} count={counts[i]:,} ({mode})")

    t = time.perf_counter()
    snap = machine.snapshot(resume=False)
    step(f"snapshot ({snap.metadata['pages_written']} pages written)", t)
    machine.close()

    for n in range(3):
        t = time.perf_counter()
        clone = Machine.restore(snap)
        step(f"restore #{n + 1} into a new VM (running)", t)
        time.sleep(0.02)
        clone.pause()
        now = read_results(clone.core).counters[:2]
        print(f"    continued from {counts[0]:,}/{counts[1]:,} to {now[0]:,}/{now[1]:,}")
        clone.close()

    with Machine.restore(snap) as clone:
        t = time.perf_counter()
        forks = clone.fork(4)
        step("fork the restored machine into 4", t)
        for fork in forks:
            fork.close()
    snap.remove()
    print("ok")


if __name__ == "__main__":
    main()
