#!/usr/bin/env python3
"""Snapshot and restore (issue 6, "Measure").

One run measures, side by side and interleaved (so host noise hits every
variant alike):

* Latency from the call to the guest's first MMIO write, for a cold start
  (``Machine()`` + ``load_test_guest`` + ``start``) and for restores of a
  snapshot of the same guest, at 64 MiB, 256 MiB and 2 GiB. The test guest
  runs in MARKS mode: it writes a mark to the test device every 4096 spins,
  and the device stamps each with the host's steady clock (comparable with
  ``time.monotonic()``). The snapshot is taken with the guest told to halt
  after its next mark, so every restored copy writes exactly one mark and
  then sleeps. Restore variants:
    - new VM: ``Machine.restore`` with an empty pool (create the VM, memslot,
      irqchip and vCPUs during the restore);
    - pool (shape): a machine of the snapshot's shape prepared in advance by
      ``Machine.prepare_restores(snapshot, n, premap=False)``; the restore
      maps the images over its RAM;
    - pool (premapped): prepared with the snapshot's images already mapped
      and its state read, checked and applied; the restore sets the clock and
      the TSCs and runs.
  Before each pool restore the benchmark waits until the pool holds a ready
  machine (outside the timed region): it measures a restore from a warm pool.
* Where restore time goes: the medians of ``restore_phases()`` per variant.
* Host RSS of one idle restored VM beyond the guest pages it touched (see
  ``idle_rss`` for the method), and the memory a prepared machine holds.
* 100 restores of one snapshot, each running to its first MMIO write: wall
  time from the first call to the last first write; and ``Machine.fork(100)``.
* Snapshot time against pages dirtied (1, 4, 16, 256 MiB): the guest (DIRTY
  mode) writes one word into each 4 KiB page of N MiB after a restore, then
  the diff snapshot is timed; also a full snapshot of a cold guest that
  dirtied the same N MiB.

Goals (issue 6): restore p50 <= 2 ms at any size; idle RSS <= 2 MiB beyond
touched pages; 100 forks <= 1 s; a diff snapshot of 4 MiB dirtied <= 5 ms.
The exit code is 0 even when a goal is missed (this is a measurement).

    .venv/bin/python benchmarks/restore.py                  # full run (about 45 s here)
    .venv/bin/python benchmarks/restore.py --quick          # 10 runs per variant
    .venv/bin/python benchmarks/restore.py --only latency   # or rss, forks, snapshot; RUNS=n sets the count
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

from benchlib import memory_sample, pct, per_vm, rollup  # benchmarks/, beside this script

from cellvm import _core, testguest
from cellvm.machine import Machine
from cellvm.snapshot import Snapshot, default_snapshot_root
from cellvm.testguest import Mode

PVM = _core.hypervisor_info()["backend"] == "pvm"
SPINS = 4096  # guest spins between marks: ~2-5 us


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def wait_marks(m: Machine | _core.Machine, n: int = 1, timeout: float = 10.0) -> list[tuple[int, int, float]]:
    deadline = time.monotonic() + timeout
    while len(marks := m.marks()) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no mark after {timeout} s (got {marks})")
        time.sleep(0.0002)
    return marks


def set_param_a(m: Machine, value: int) -> None:
    m.write_memory(testguest.PARAM_A_GPA, value.to_bytes(8, "little"))


# ------------------------------------------------------------------ latency


def paused_marks_guest(mib: int) -> Machine:
    """A MARKS guest paused after mark k and told to halt after mark k+1:
    each restored copy writes exactly one mark, then sleeps."""
    m = Machine(memory_mib=mib, vcpus=1)
    try:
        m.load_test_guest(testguest.path(), testguest.params(Mode.MARKS, 1, 0, SPINS, native=PVM))
        m.start()
        wait_marks(m, 100)
        m.pause()
        set_param_a(m, m.marks()[-1][0] + 1)
    except BaseException:
        m.close()
        raise
    return m


def marks_snapshot(mib: int, root: Path) -> Snapshot:
    """The snapshot every restore variant starts from (paused_marks_guest)."""
    m = paused_marks_guest(mib)
    try:
        return m.snapshot(root / f"marks-{mib}", resume=False)
    finally:
        m.close()


def cold_once(mib: int) -> float:
    t = time.monotonic()
    m = Machine(memory_mib=mib, vcpus=1)
    try:
        m.load_test_guest(testguest.path(), testguest.params(Mode.MARKS, 1, 1, SPINS, native=PVM))
        m.start()
        return wait_marks(m)[0][2] - t
    finally:
        m.close()


def restore_once(snap: Snapshot) -> tuple[float, dict[str, float]]:
    t = time.monotonic()
    m = Machine.restore(snap)
    try:
        first = wait_marks(m)[0][2]
        phases = dict(m.restore_phases())
        phases["call"] = t - m.restore_started  # Python call -> C++ restore start (negative)
        phases["first_mark"] = first - m.restore_started
        return first - t, phases
    finally:
        m.close()


VARIANTS = ("cold", "restore: new VM", "restore: pool (shape)", "restore: pool (premapped)")


def latency(sizes: list[int], runs: int, root: Path) -> tuple[dict, dict]:
    snaps = {mib: marks_snapshot(mib, root) for mib in sizes}
    samples: dict[tuple[int, str], list[float]] = defaultdict(list)
    phases: dict[tuple[int, str], list[dict[str, float]]] = defaultdict(list)
    for i in range(runs):
        for mib in sizes:
            snap = snaps[mib]
            order = VARIANTS[i % 4 :] + VARIANTS[: i % 4]  # rotate so no variant always runs first
            for variant in order:
                if variant == "cold":
                    samples[mib, variant].append(cold_once(mib))
                    continue
                if variant == "restore: new VM":
                    Machine.prepare_restores(snap, 0, premap=False)
                    Machine.prepare_restores(snap, 0, premap=True)
                else:
                    premap = variant.endswith("(premapped)")
                    Machine.prepare_restores(snap, 1, premap=premap)
                    Machine.wait_prepared(snap, 1, premap=premap)
                latency_s, ph = restore_once(snap)
                samples[mib, variant].append(latency_s)
                phases[mib, variant].append(ph)
                Machine.prepare_restores(snap, 0, premap=False)
                Machine.prepare_restores(snap, 0, premap=True)
    return samples, phases


PHASES = [  # (label, from stamp, to stamp)
    ("Python call -> C++ restore()", "call", "start"),
    ("state file read + checksum", "start", "state_read"),
    ("parse, checks, vCPU state decode", "state_read", "state_parse"),
    ("take a prepared VM from the pool", None, "pool_take"),
    ("mmap memory images", None, "memory_map"),
    ("KVM_CREATE_VM", "memory_map", "vm_create"),
    ("memslot", "vm_create", "memslot"),
    ("irqchip", "memslot", "irqchip"),
    ("vCPUs + CPUID", "irqchip", "vcpus_cpuid"),
    ("set VM state (irqchip, clock, devices) + thread spawn", None, "vm_state_threads"),
    ("vCPU thread wakes", "vm_state_threads", "vcpu_woke.0"),
    ("vCPU applies its state (ioctls)", "vcpu_woke.0", "vcpu_applied.0"),
    ("rendezvous: requester sees all applied", "vcpu_applied.0", "vcpu_apply"),
    ("applied -> first exit (run, guest faults, MMIO)", "vcpu_applied.0", "first_exit.0"),
    ("first exit -> mark stamped", "first_exit.0", "first_mark"),
    ("total: C++ start -> first mark", "start", "first_mark"),
]

ORDER = ["start", "state_read", "state_parse", "pool_take", "memory_map", "vm_create", "memslot", "irqchip",
         "vcpus_cpuid", "vm_state_threads"]


def phase_durations(ph: dict[str, float]) -> dict[str, float]:
    out = {}
    for label, frm, to in PHASES:
        if to not in ph:
            continue
        if frm is None:  # the previous requester-side stamp present
            i = ORDER.index(to)
            frm = next(s for s in reversed(ORDER[:i]) if s in ph)
        if frm not in ph:
            continue
        out[label] = ph[to] - ph[frm] if label != "Python call -> C++ restore()" else -ph["call"]
    return out


# ------------------------------------------------------------------ memory


def idle_rss(snap: Snapshot, count: int) -> dict[str, float]:
    """RSS of `count` idle restored VMs beyond the guest pages they touched.

    Method: warm up (one restore, closed), gc, read /proc/self/smaps_rollup;
    restore `count` VMs (new-VM path, empty pool), wait for each one's mark
    (the guest then halts: idle), sleep 50 ms, read it again. The guest pages a
    VM touched are the resident pages of its memory.bin mapping (the file
    pages the guest read and the private copies it wrote), summed over the
    memory.bin mappings in /proc/self/smaps. RSS beyond = delta Rss - those.
    What stays in the kernel (KVM's vCPU and memslot structures, shadow page
    tables) is not process RSS and is not counted."""
    restore_once(snap)
    gc.collect()
    time.sleep(0.05)
    before = memory_sample()
    machines = [Machine.restore(snap) for _ in range(count)]
    try:
        for m in machines:
            wait_marks(m)
        time.sleep(0.05)
        after = memory_sample()
    finally:
        for m in machines:
            m.close()
    return per_vm(before, after, count)


def meminfo() -> dict[str, int]:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":", 1)
        out[key] = int(value.split()[0]) * 1024
    return out


def prepared_cost(snap: Snapshot, count: int) -> dict[str, float]:
    """Host memory per prepared (premapped) machine waiting in the pool:
    process Rss, and the kernel's (Slab + KernelStack + PageTables + vmalloc,
    from /proc/meminfo, so other processes' activity is in it too: indicative)."""
    gc.collect()
    before, kbefore = rollup(), meminfo()
    Machine.prepare_restores(snap, count)
    Machine.wait_prepared(snap, count, timeout=60)
    time.sleep(0.05)
    after, kafter = rollup(), meminfo()
    Machine.prepare_restores(snap, 0)
    kernel = sum(kafter[k] - kbefore[k] for k in ("Slab", "KernelStack", "PageTables", "VmallocUsed"))
    return {"rss": (after["Rss"] - before["Rss"]) / count, "kernel": kernel / count}


# ------------------------------------------------------------------ forks


def forks(snap: Snapshot, n: int, pool: bool) -> dict[str, float]:
    if pool:
        Machine.prepare_restores(snap, n, premap=True)
        Machine.wait_prepared(snap, n, premap=True, timeout=120)
    t = time.monotonic()
    machines = []
    try:
        for _ in range(n):
            machines.append(Machine.restore(snap))
        returned = time.monotonic()
        last = max(wait_marks(m)[0][2] for m in machines)
        return {"wall": last - t, "calls": returned - t}
    finally:
        Machine.prepare_restores(snap, 0, premap=True)
        for m in machines:
            m.close()


def fork_api(mib: int, n: int) -> dict[str, float]:
    """Machine.fork(n) of a live MARKS guest (snapshot to tmpfs + n restores)."""
    m = paused_marks_guest(mib)
    clones: list[Machine] = []
    try:
        t = time.monotonic()
        clones = m.fork(n)
        returned = time.monotonic()
        last = max(wait_marks(c)[0][2] for c in clones)
        return {"wall": last - t, "calls": returned - t}
    finally:
        for c in clones:
            c.close()
        m.close()


# ------------------------------------------------------------------ snapshot time


def dirty_base(mib: int, root: Path) -> Snapshot:
    m = Machine(memory_mib=mib, vcpus=1)
    try:
        m.load_test_guest(testguest.path(), testguest.params(Mode.DIRTY, 1, 0, 0, native=PVM))
        m.start()
        wait_marks(m)  # mark 0: waiting for N
        return m.snapshot(root / f"dirty-{mib}", resume=False)
    finally:
        m.close()


def diff_snapshot_once(base: Snapshot, dirty_mib: int, root: Path, i: int) -> dict[str, float]:
    with Machine.restore(base) as m:
        set_param_a(m, dirty_mib)
        wait_marks(m, 1)  # mark N (a restored machine's mark log starts empty)
        return timed_snapshot(m, root / f"diff-{dirty_mib}-{i}")


def full_snapshot_once(mib: int, dirty_mib: int, root: Path, i: int) -> dict[str, float]:
    with Machine(memory_mib=mib, vcpus=1) as m:
        m.load_test_guest(testguest.path(), testguest.params(Mode.DIRTY, 1, dirty_mib, 0, native=PVM))
        m.start()
        wait_marks(m, 2)
        return timed_snapshot(m, root / f"full-{dirty_mib}-{i}")


def timed_snapshot(m: Machine, path: Path) -> dict[str, float]:
    """Snapshot `m` (left paused) into `path`: the SDK call's seconds, the
    C++ pause-to-written seconds, the pages written; then delete it."""
    t = time.monotonic()
    snap = m.snapshot(path, resume=False)
    sdk = time.monotonic() - t
    snap.remove()
    return {"sdk": sdk, "core": snap.metadata["pause_seconds"], "pages": snap.metadata["pages_written"]}


# ------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs (10 instead of 50, 3 instead of 7)")
    parser.add_argument("--only", nargs="+", choices=["latency", "rss", "forks", "snapshot"],
                        help="run only these sections")
    args = parser.parse_args()
    only = set(args.only or ["latency", "rss", "forks", "snapshot"])
    runs = int(os.environ.get("RUNS", 10 if args.quick else 50))
    snap_runs = 3 if args.quick else 7
    sizes = [64, 256, 2048]
    n_forks = 100
    root = default_snapshot_root() / f"bench-restore-{os.getpid()}"
    root.mkdir(parents=True)
    started = time.monotonic()
    try:
        print(f"cellvm restore benchmark: backend {_core.hypervisor_info()['backend']}, {os.cpu_count()} CPUs, "
              f"load {os.getloadavg()[0]:.1f}, snapshots in {root.parent} ({runs} runs per variant)\n")
        snap256 = marks_snapshot(256, root / "rss-forks") if only - {"latency", "snapshot"} else None
        if "latency" in only:
            print_latency(sizes, runs, root)
        if "rss" in only:
            print_rss(snap256)
        if "forks" in only:
            print_forks(snap256, n_forks)
        if "snapshot" in only:
            print_snapshot_times(root, snap_runs)
        print(f"\n(run took {time.monotonic() - started:.0f} s; load {os.getloadavg()[0]:.1f})")
    finally:
        _core.vm_pool_clear()
        shutil.rmtree(root, ignore_errors=True)
    return 0


def print_latency(sizes: list[int], runs: int, root: Path) -> None:
    samples, phases = latency(sizes, runs, root)

    print("## Call to the guest's first MMIO write (ms)\n")
    print("| guest | variant | p50 | p90 | p10-p90 spread | p50 vs cold |")
    print("|---|---|---|---|---|---|")
    for mib in sizes:
        cold = statistics.median(samples[mib, "cold"])
        for variant in VARIANTS:
            v = samples[mib, variant]
            p50 = statistics.median(v)
            ratio = "1" if variant == "cold" else f"{p50 / cold:.2f}x ({cold / p50:.1f}x faster)"
            goal = "" if variant == "cold" else (" ok" if p50 <= 0.002 else " MISSED (goal 2 ms)")
            print(f"| {mib} MiB | {variant} | {ms(p50)}{goal} | {ms(pct(v, 90))} | "
                  f"{ms(pct(v, 10))}-{ms(pct(v, 90))} | {ratio} |")
    print()

    print("## Restore breakdown, p50 per phase (us)\n")
    cols = [(mib, v) for mib in (sizes[1], sizes[2]) for v in VARIANTS[1:]]
    print("| phase | " + " | ".join(f"{mib} MiB {v.split(': ')[1]}" for mib, v in cols) + " |")
    print("|---|" + "---|" * len(cols))
    durations = {c: [phase_durations(p) for p in phases[c]] for c in cols}
    for label, _, _ in PHASES:
        cells = []
        for c in cols:
            vals = [d[label] for d in durations[c] if label in d]
            cells.append(f"{statistics.median(vals) * 1e6:.0f}" if len(vals) >= len(durations[c]) // 2 else "-")
        print(f"| {label} | " + " | ".join(cells) + " |")
    print()



def print_rss(snap256: Snapshot) -> None:
    print("## Host RSS of idle restored VMs (256 MiB guest, KiB per VM)\n")
    print("| VMs | RSS delta | guest pages touched (of which COW copies) | RSS beyond touched pages | goal |")
    print("|---|---|---|---|---|")
    for count in (1, 10):
        r = idle_rss(snap256, count)
        goal = "ok" if r["beyond"] <= 2 << 20 else "MISSED (2 MiB)"
        print(f"| {count} | {r['rss_delta'] / 1024:.0f} | {r['touched'] / 1024:.0f} "
              f"({r['cow'] / 1024:.0f}) | {r['beyond'] / 1024:.0f} | {goal} |")
    print()
    cost = prepared_cost(snap256, 20)
    print(f"A prepared (premapped) 256 MiB machine waiting in the pool, per machine (20 prepared): process Rss "
          f"{cost['rss'] / 1024:.0f} KiB, kernel (slab, stacks, page tables, vmalloc; host-wide, indicative) "
          f"{cost['kernel'] / 1024:.0f} KiB\n")



def print_forks(snap256: Snapshot, n_forks: int) -> None:
    print(f"## {n_forks} forks of one snapshot (256 MiB guest), each to its first MMIO write\n")
    print("| how | wall time to the last first write (ms) | restore calls alone (ms) | goal 1 s |")
    print("|---|---|---|---|")
    for label, fn in (
        ("restores, new VMs", lambda: forks(snap256, n_forks, pool=False)),
        ("restores, pool (premapped, prepared before)", lambda: forks(snap256, n_forks, pool=True)),
        (f"Machine.fork({n_forks}) of a live guest (incl. its snapshot)", lambda: fork_api(256, n_forks)),
    ):
        r = fn()
        print(f"| {label} | {ms(r['wall'])} | {ms(r['calls'])} | {'ok' if r['wall'] <= 1 else 'MISSED'} |")
    print()



def print_snapshot_times(root: Path, snap_runs: int) -> None:
    print("## Snapshot time vs memory dirtied (512 MiB guest, ms, median)\n")
    print("| dirtied | diff snapshot of a restored guest: SDK call | of which C++ (pause to resume) "
          "| pages written | full snapshot of a cold guest: SDK call | C++ | pages written |")
    print("|---|---|---|---|---|---|---|")
    base = dirty_base(512, root)
    for dirty in (1, 4, 16, 256):
        diffs = [diff_snapshot_once(base, dirty, root, i) for i in range(snap_runs)]
        fulls = [full_snapshot_once(512, dirty, root, i) for i in range(snap_runs)]
        d_sdk = statistics.median(x["sdk"] for x in diffs)
        goal = (" ok" if d_sdk <= 0.005 else " MISSED (goal 5 ms)") if dirty == 4 else ""
        print(f"| {dirty} MiB | {ms(d_sdk)}{goal} | {ms(statistics.median(x['core'] for x in diffs))} | "
              f"{diffs[0]['pages']:.0f} | {ms(statistics.median(x['sdk'] for x in fulls))} | "
              f"{ms(statistics.median(x['core'] for x in fulls))} | {fulls[0]['pages']:.0f} |")
    print()


if __name__ == "__main__":
    sys.exit(main())
