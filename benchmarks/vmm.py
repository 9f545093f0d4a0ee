#!/usr/bin/env python3
"""cellvm's VMM against the raw-ioctl floor (issue 4, "Measure").

One run measures, for cellvm (``cellvm._core``) and for benchmarks/floor/floor.c
(a minimal C program of raw KVM ioctls, no cellvm code) in the same run:

* VM + vCPU creation: ``_core.Machine(memory_mib=64, vcpus=1)`` timed in
  Python around the call, against the same steps timed inside the C program
  (CREATE_VM, memfd RAM, memslot, irqchip, vCPU + kvm_run mmap, SET_CPUID2).
  The Python figure includes the Python -> nanobind call, so the table also
  shows cellvm's creation at the syscall layer: an LD_PRELOAD helper
  (floor/ioctl_span.c) timestamps its ioctls and memfd_create, and the span
  runs from the first memfd_create/KVM_CREATE_VM to the end of the last
  KVM_SET_CPUID2, the same span floor.c times around its own steps.
  /dev/kvm and KVM_GET_SUPPORTED_CPUID are opened/read once per process on
  both sides (cellvm: Kvm::instance()); a separate row times the first
  creation in a fresh process, which includes them, and an (info) row times
  tearing a just-created VM down. A third creation row compares cellvm with
  floor.c's own creation code loaded into the same Python process (ctypes,
  alternating one for one), which separates what cellvm's code costs from
  what running inside a Python process costs.
* MMIO exit round trip: the test guest's MMIO_LOOP mode, as guest-rdtsc cycles
  per store and as host wall time per exit (first KVM_RUN / start() to the
  guest's exit store, divided by the number of stores).
* null hypercall and native user<->supervisor syscall round trip: the test
  guest's SYSCALLS mode, timed by the guest with rdtsc.

Runs alternate (cellvm, floor, floor, cellvm, ...) so host noise hits both;
every figure is a median over repetitions, and the ratio is the median of
the per-repetition cellvm / floor ratios (see report()).
Goal: within 1.2x of the floor. The exit code is 0 even when a goal is missed
(this is a measurement); misses are printed as MISSED.

    .venv/bin/python benchmarks/vmm.py            # full run (a few minutes on a busy host)
    .venv/bin/python benchmarks/vmm.py --quick    # short run
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cellvm import _core, testguest
from cellvm.testguest import Mode, read_results

GOAL = 1.2
HERE = Path(__file__).resolve().parent
FLOOR_SRC = HERE / "floor" / "floor.c"
SPAN_SRC = HERE / "floor" / "ioctl_span.c"


def cache_dir() -> Path:
    return Path(os.environ.get("CELLVM_CACHE", Path.home() / ".cache" / "cellvm")) / "bench"


def cellvm_build() -> str:
    """Which cellvm was measured: the commit, and whether csrc/ had local changes
    (the extension in the venv is built from the working tree)."""
    repo = HERE.parent
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--", "csrc"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git)"
    so = Path(_core.__file__)
    built = time.strftime("%H:%M:%S", time.gmtime(so.stat().st_mtime))
    return f"{head}{' + uncommitted csrc/ changes' if dirty else ''} (extension built {built} UTC)"


def build_c(src: Path, suffix: str = "", flags: tuple[str, ...] = ()) -> Path:
    """Compile `src` with cc -O2 into the cache, named by a hash of the source,
    the flags and the compiler: a changed source or compiler gives a new file."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        sys.exit(f"vmm.py: no C compiler ({cc}) to build {src}")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(src.read_bytes() + " ".join(flags).encode() + version.encode()).hexdigest()[:16]
    out = cache_dir() / f"{src.stem}-{key}{suffix}"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
        subprocess.run([cc, "-O2", "-Wall", *flags, "-o", str(tmp), str(src)], check=True)
        tmp.replace(out)
    return out


def build_floor(library: bool = False) -> Path:
    """floor.c as a program, or (library=True) as the -DFLOOR_LIB shared object."""
    if library:
        return build_c(FLOOR_SRC, ".so", ("-DFLOOR_LIB", "-shared", "-fPIC", "-Wno-unused"))
    return build_c(FLOOR_SRC)


def build_span_shim() -> Path:
    return build_c(SPAN_SRC, ".so", ("-shared", "-fPIC", "-ldl"))


class InProcessFloor:
    """floor.c's creation loaded into this process: the same ioctls, timed in C,
    in the same process context (address space, allocator, CPU caches) as cellvm."""

    def __init__(self) -> None:
        self._lib = ctypes.CDLL(str(build_floor(library=True)))
        self._lib.floor_create_once.restype = ctypes.c_uint64

    def create_once(self) -> int:
        return self._lib.floor_create_once()


@dataclass
class Config:
    reps: int
    creates: int  # VM+vCPU creations per repetition and side
    mmio_iters: int
    syscall_iters: int


@dataclass
class Side:
    """Every sample of one side (cellvm or floor); per-repetition lists."""

    create_ns: list[list[float]] = field(default_factory=list)  # per repetition: every creation
    create_span_ns: list[list[float]] = field(default_factory=list)  # cellvm: syscall span (ioctl_span.c)
    create_inproc_ns: list[list[float]] = field(default_factory=list)  # floor code inside cellvm's process
    cold_ns: list[float] = field(default_factory=list)  # the first Machine of a fresh process
    destroy_ns: list[list[float]] = field(default_factory=list)  # per repetition: teardown right after creation
    mmio_guest_ns: list[float] = field(default_factory=list)
    mmio_wall_ns: list[float] = field(default_factory=list)
    hypercall_ns: list[float] = field(default_factory=list)
    syscall_ns: list[float] = field(default_factory=list)
    mmio_kvm_exits: list[int] = field(default_factory=list)
    syscalls_kvm_exits: list[int] = field(default_factory=list)
    extra: dict[str, list[float]] = field(default_factory=dict)

    def add_extra(self, name: str, value: float) -> None:
        self.extra.setdefault(name, []).append(value)


def cycles_to_ns(cycles: int, iterations: int, tsc_khz: int) -> float:
    return cycles / iterations / tsc_khz * 1e6


# ---------------------------------------------------------------- cellvm


def nanobind_call_overhead_ns(samples: int = 300) -> float:
    """Median cost of a _core call that releases the GIL and does nothing
    (close() on a closed machine): what Python adds around Machine()."""
    m = _core.Machine(memory_mib=64, vcpus=1)
    m.close()
    times = []
    for _ in range(samples):
        t = time.perf_counter_ns()
        m.close()
        times.append(time.perf_counter_ns() - t)
    return statistics.median(times)


def cellvm_guest_run(mode: Mode, iterations: int) -> tuple[_core.Machine, float, dict[str, int]]:
    m = _core.Machine(memory_mib=64, vcpus=1)
    m.load_test_guest(str(testguest.path()), testguest.params(mode, 1, iterations, native=m.backend == "pvm"))
    t = time.perf_counter_ns()
    m.start()
    code = m.wait(timeout=600)
    wall = time.perf_counter_ns() - t
    if code != 0:
        raise RuntimeError(f"cellvm: test guest {mode.name} exited with {code}")
    return m, wall, m.vcpu_stats(0)


# Run with LD_PRELOAD=ioctl_span.so: each creation's span from the first
# memfd_create/KVM_CREATE_VM to the end of the last KVM_SET_CPUID2.
SPAN = """
import ctypes, json, sys
from cellvm import _core
lib = ctypes.CDLL(None)
class Rec(ctypes.Structure):
    _fields_ = [("what", ctypes.c_ulong), ("t0", ctypes.c_uint64), ("t1", ctypes.c_uint64)]
recs = (Rec * 65536).in_dll(lib, "span_recs")
count = ctypes.c_int.in_dll(lib, "span_n")
lib.span_now.restype = ctypes.c_uint64
KVM_CREATE_VM, KVM_SET_CPUID2, MEMFD = 0xae01, 0x4008ae90, 1
_core.Machine(memory_mib=64, vcpus=1).close()
spans = []
for _ in range(int(sys.argv[1])):
    start = count.value
    t0 = lib.span_now()
    m = _core.Machine(memory_mib=64, vcpus=1)
    t1 = lib.span_now()
    rs = [recs[i] for i in range(start, count.value)]
    first = min(r.t0 for r in rs if r.what in (KVM_CREATE_VM, MEMFD))
    last = max(r.t1 for r in rs if r.what == KVM_SET_CPUID2)
    spans.append([last - first, first - t0, t1 - last])  # span, Python call -> first syscall, last -> return
    m.close()
    del m
print(json.dumps(spans))
"""

COLD = """
import time
from cellvm import _core
t = time.perf_counter_ns()
m = _core.Machine(memory_mib=64, vcpus=1)
print(time.perf_counter_ns() - t)
m.close()
"""


def run_cellvm(cfg: Config, side: Side, inproc: InProcessFloor, floor: Side, shim: Path) -> None:
    # Cold: the first Machine() of a process also opens /dev/kvm and reads
    # the host-wide tables (Kvm::instance()); the import is not timed.
    cold = subprocess.run([sys.executable, "-c", COLD], check=True, capture_output=True, text=True)
    side.cold_ns.append(float(cold.stdout))
    span = subprocess.run([sys.executable, "-c", SPAN, str(cfg.creates)], check=True, capture_output=True,
                          text=True, env={**os.environ, "LD_PRELOAD": str(shim)})
    spans = json.loads(span.stdout)
    side.create_span_ns.append([x[0] for x in spans])
    side.add_extra("before_span_ns", statistics.median(x[1] for x in spans))
    side.add_extra("after_span_ns", statistics.median(x[2] for x in spans))

    _core.Machine(memory_mib=64, vcpus=1).close()  # warm-up (the floor also discards one)
    inproc.create_once()
    samples, teardown, floor_samples = [], [], []
    for _ in range(cfg.creates):
        floor_samples.append(inproc.create_once())  # alternating, one for one
        t = time.perf_counter_ns()
        m = _core.Machine(memory_mib=64, vcpus=1)
        samples.append(time.perf_counter_ns() - t)
        t = time.perf_counter_ns()
        m.close()
        del m  # the last reference: ~Machine closes the fds here
        teardown.append(time.perf_counter_ns() - t)
    side.create_ns.append(samples)
    side.destroy_ns.append(teardown)
    floor.create_inproc_ns.append(floor_samples)
    side.add_extra("call_overhead_ns", nanobind_call_overhead_ns())

    m, wall, stats = cellvm_guest_run(Mode.MMIO_LOOP, cfg.mmio_iters)
    r, khz = read_results(m), m.tsc_khz
    m.close()
    side.mmio_guest_ns.append(cycles_to_ns(r.mmio_cycles, cfg.mmio_iters, khz))
    side.mmio_wall_ns.append(wall / cfg.mmio_iters)
    side.mmio_kvm_exits.append(stats["exits"])

    m, wall, stats = cellvm_guest_run(Mode.SYSCALLS, cfg.syscall_iters)
    r, khz = read_results(m), m.tsc_khz
    m.close()
    if r.hypercall_ret != -38 or not r.user_cs == r.cs_native[0] == 0x33:
        raise RuntimeError(f"cellvm: SYSCALLS mode did not run as expected: {r}")
    side.hypercall_ns.append(cycles_to_ns(r.hypercall_cycles, cfg.syscall_iters, khz))
    side.syscall_ns.append(cycles_to_ns(r.syscall_cycles, cfg.syscall_iters, khz))
    side.syscalls_kvm_exits.append(stats["exits"])


# ---------------------------------------------------------------- floor


def run_floor(binary: Path, cfg: Config, side: Side) -> None:
    out = subprocess.run(
        [str(binary), str(testguest.path()), str(cfg.creates), str(cfg.mmio_iters), str(cfg.syscall_iters)],
        check=True, capture_output=True, text=True,
    ).stdout
    f = json.loads(out)
    khz = f["tsc_khz"]
    mmio, sysc = f["mmio"], f["syscalls"]
    native = mmio["cs_native"] == sysc["cs_native"] == sysc["user_cs"] == 0x33
    if mmio["exit_code"] != 0 or sysc["exit_code"] != 0 or sysc["hypercall_ret"] != -38 or not native:
        raise RuntimeError(f"floor: test guest did not run as expected: {out}")
    side.create_ns.append(f["create_ns"])
    side.destroy_ns.append(f["destroy_ns"])
    side.cold_ns.append(f["cold_ns"])
    side.add_extra("open_ns", statistics.median(f["open_ns"]))
    for step, ns in f["steps_ns"].items():
        side.add_extra(f"step_{step}_ns", ns)
    side.mmio_guest_ns.append(cycles_to_ns(mmio["cycles"], cfg.mmio_iters, khz))
    side.mmio_wall_ns.append(mmio["wall_ns"] / cfg.mmio_iters)
    side.mmio_kvm_exits.append(mmio["kvm_exits"])
    side.hypercall_ns.append(cycles_to_ns(sysc["hypercall_cycles"], cfg.syscall_iters, khz))
    side.syscall_ns.append(cycles_to_ns(sysc["syscall_cycles"], cfg.syscall_iters, khz))
    side.syscalls_kvm_exits.append(sysc["kvm_exits"])


# ---------------------------------------------------------------- report


def fmt_us(ns: float) -> str:
    us = ns / 1000
    return f"{us:.3f} us" if us < 10 else f"{us:.1f} us"


def report(cfg: Config, cellvm: Side, floor: Side) -> list[dict]:
    """Prints the table; returns its rows.

    Each repetition runs both sides back to back, so its cellvm/floor ratio
    compares the two under the same host load. The ratio column is the
    median of those per-repetition ratios (their range is shown beside it);
    the cellvm and floor columns are medians over repetitions (for creation
    and teardown: of each repetition's median). Host noise only ever adds
    time, so "best" (fastest cellvm repetition / fastest floor repetition)
    is shown as a second, noise-resistant estimate."""
    med = statistics.median
    overhead = med(cellvm.extra["call_overhead_ns"])
    per_rep = lambda reps, shift=0.0: [med(r) - shift for r in reps]  # noqa: E731
    rows = [
        ("VM+vCPU creation, Python call around Machine()", per_rep(cellvm.create_ns), per_rep(floor.create_ns), True),
        ("VM+vCPU creation, syscall span (LD_PRELOAD)", per_rep(cellvm.create_span_ns), per_rep(floor.create_ns),
         True),
        ("VM+vCPU creation, floor code in cellvm's process", per_rep(cellvm.create_ns),
         per_rep(floor.create_inproc_ns), True),
        ("first VM+vCPU of a process (cold)", cellvm.cold_ns, floor.cold_ns, True),
        ("MMIO exit round trip, guest rdtsc", cellvm.mmio_guest_ns, floor.mmio_guest_ns, True),
        ("MMIO exit round trip, host wall", cellvm.mmio_wall_ns, floor.mmio_wall_ns, True),
        ("null hypercall (int $0x1b), guest rdtsc", cellvm.hypercall_ns, floor.hypercall_ns, True),
        ("native syscall round trip, guest rdtsc", cellvm.syscall_ns, floor.syscall_ns, True),
        ("(info) teardown right after creation", per_rep(cellvm.destroy_ns), per_rep(floor.destroy_ns), False),
    ]
    results = []
    w = max(len(r[0]) for r in rows)
    head = f"{'operation':<{w}}  {'cellvm':>10}  {'floor':>10}  {'ratio':>6}  {'per-rep range':>13}  {'best':>5}  goal"
    print(head)
    print("-" * len(head))
    missed = []
    for name, a, b, has_goal in rows:
        pr = [x / y for x, y in zip(a, b)]
        ratio = med(pr)
        ok = ratio <= GOAL if has_goal else None
        if ok is False:
            missed.append(name)
        status = f"<= {GOAL}x {'ok' if ok else 'MISSED'}" if has_goal else "no goal"
        best = min(a) / min(b)
        print(f"{name:<{w}}  {fmt_us(med(a)):>10}  {fmt_us(med(b)):>10}  {ratio:5.2f}x  "
              f"{min(pr):6.2f}-{max(pr):<6.2f}  {best:4.2f}x  {status}")
        results.append({"operation": name, "cellvm_ns": med(a), "floor_ns": med(b), "ratio": ratio,
                        "per_rep_ratios": pr, "best_ratio": best, "ok": ok})
    print()
    print(f"no-op _core call (GIL released): {fmt_us(overhead)}; floor open(/dev/kvm) + KVM_GET_SUPPORTED_CPUID: "
          f"{fmt_us(med(floor.extra['open_ns']))} (once per process on both sides: only in the cold row)")
    print(f"cellvm Machine() outside the syscall span (same process): Python call -> first syscall "
          f"{fmt_us(med(cellvm.extra['before_span_ns']))}, last syscall -> back in Python "
          f"{fmt_us(med(cellvm.extra['after_span_ns']))}")
    steps = {k[5:-3]: med(v) for k, v in floor.extra.items() if k.startswith("step_")}
    print("floor creation steps (medians): " + ", ".join(f"{k} {fmt_us(v)}" for k, v in steps.items()))
    print(f"KVM exits (binary stats) per MMIO_LOOP run: cellvm {int(med(cellvm.mmio_kvm_exits))}, "
          f"floor {int(med(floor.mmio_kvm_exits))} for {cfg.mmio_iters} stores; per SYSCALLS run: "
          f"cellvm {int(med(cellvm.syscalls_kvm_exits))}, floor {int(med(floor.syscalls_kvm_exits))} "
          f"for {cfg.syscall_iters} hypercalls + {cfg.syscall_iters} syscalls")
    print()
    n_goal = sum(r[3] for r in rows)
    if missed:
        print(f"MISSED: {len(missed)} of {n_goal} figures above {GOAL}x the raw-ioctl floor: " + "; ".join(missed))
    else:
        print(f"all {n_goal} figures within {GOAL}x of the raw-ioctl floor")
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short run (fewer repetitions and iterations)")
    ap.add_argument("--reps", type=int, help="repetitions per side (default 11, --quick 5)")
    ap.add_argument("--json", type=Path, help="also write every sample to this file")
    args = ap.parse_args()
    if args.quick:
        cfg = Config(reps=5, creates=8, mmio_iters=1_000, syscall_iters=5_000)
    else:
        cfg = Config(reps=11, creates=20, mmio_iters=5_000, syscall_iters=50_000)
    if args.reps:
        cfg.reps = args.reps

    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("vmm.py: /dev/kvm is not usable here; nothing to measure")
        return 0
    backend = _core.hypervisor_info()["backend"]
    if backend != "pvm":
        # The test guest's hypercalls and native syscalls are this host's PVM
        # protocol (int $0x1b, int $0x19); the floor opts in to it unconditionally.
        print(f"vmm.py: /dev/kvm is {backend}, not kvm-pvm; this benchmark measures the PVM host only")
        return 0
    binary = build_floor()
    inproc = InProcessFloor()
    shim = build_span_shim()
    load = os.getloadavg()
    print(f"cellvm VMM vs raw-ioctl floor: backend {backend}, {os.cpu_count()} CPUs, "
          f"load {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}, {os.uname().release}")
    print(f"cellvm {cellvm_build()}")
    print(f"{cfg.reps} repetitions x ({cfg.creates} creations, MMIO_LOOP {cfg.mmio_iters}, "
          f"SYSCALLS {cfg.syscall_iters}) per side, alternating; floor {binary}")
    print(flush=True)

    cellvm, floor = Side(), Side()
    started = time.monotonic()
    for rep in range(cfg.reps):
        order = [("cellvm", lambda: run_cellvm(cfg, cellvm, inproc, floor, shim)),
                 ("floor", lambda: run_floor(binary, cfg, floor))]
        if rep % 2:
            order.reverse()
        for _, run in order:
            run()
        print(f"  repetition {rep + 1}/{cfg.reps} done ({time.monotonic() - started:.0f} s)", file=sys.stderr)
    results = report(cfg, cellvm, floor)
    end_load = os.getloadavg()
    print(f"host load at the end: {end_load[0]:.1f}/{end_load[1]:.1f}/{end_load[2]:.1f}; "
          f"{time.monotonic() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({
            "config": cfg.__dict__, "backend": backend, "loadavg": [load, end_load], "results": results,
            "cellvm": cellvm.__dict__, "floor": floor.__dict__,
        }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
