"""Issue 5 "Measure": the guest kernel on this host, guest against host in one run.

Boots the test init (guest/init) through cellvm's own VMM and reads its one
result line; runs the same timing loops on the host (`init bench`), and
prints guest/host ratios with the goals, plus boot time: VMM start to the
first byte of init's output, and to power-off.

    .venv/bin/python benchmarks/guest.py [--runs N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

from cellvm import guest
from cellvm.machine import Machine

GOALS = {"getppid_ns": 2.0, "page_fault_ns": 8.0, "compute_ms": 1.1, "fork_exit_us": None}
CMDLINE = f"console=ttyS0 quiet reboot=k panic=-1 poweroff_port=0xf4 cellvm.cpus=1 {guest.THP_ANON} {guest.FAULT_AROUND}"


def initramfs() -> Path:
    path = guest.cache_dir() / "kernel" / "testinit.cpio.gz"
    if not path.exists():
        raise SystemExit(f"no test init at {path}: run ./dev setup")
    return path.resolve()


def boot_once(kernel: Path, init: Path, cmdline: str) -> tuple[dict[str, float], float, float]:
    """(the init's figures, seconds to its first output byte, seconds to power-off)."""
    with Machine(memory_mib=256, vcpus=1) as m:
        m.load_linux(kernel, init, cmdline)
        started = time.monotonic()
        m.start()
        first = None
        while (code := m.wait(0.001)) is None:
            if first is None and m.console():
                first = time.monotonic() - started
            if time.monotonic() - started > 60:
                raise SystemExit("the test init did not power off within 60 s")
        off = time.monotonic() - started
        console = m.console().decode(errors="replace")
    line = next((ln for ln in console.splitlines() if ln.startswith("CELLVM-TESTINIT: PASS ")), None)
    if code != 0 or line is None:
        raise SystemExit(f"the test init failed:\n{console[-2000:]}")
    return json.loads(line.split(" ", 2)[2]), first or off, off


def host_bench(init_binary: Path) -> dict[str, float]:
    out = subprocess.run([str(init_binary), "bench"], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--append", default="", help="more kernel command-line arguments (A/B experiments)")
    args = parser.parse_args()
    cmdline = f"{CMDLINE} {args.append}".strip()
    kernel, init = guest.kernel_path(), initramfs()
    init_binary = init.parent / "init"
    guests, hosts, firsts, offs = [], [], [], []
    for _ in range(args.runs):  # interleaved: the host's noise hits both sides
        figures, first, off = boot_once(kernel, init, cmdline)
        guests.append(figures)
        firsts.append(first)
        offs.append(off)
        hosts.append(host_bench(init_binary))
    print(f"kernel {kernel}, {args.runs} runs, medians; command line: {cmdline}")
    print(f"{'figure':<16} {'guest':>10} {'host':>10} {'ratio':>7}  goal")
    for key, goal in GOALS.items():
        g = statistics.median(run[key] for run in guests)
        h = statistics.median(run[key] for run in hosts)
        verdict = "measured" if goal is None else ("ok" if g / h <= goal else "MISSED")
        print(f"{key:<16} {g:>10.1f} {h:>10.1f} {g / h:>6.1f}x  {'' if goal is None else f'<= {goal}x '}{verdict}")
    kernel_ms = statistics.median(run["kernel_boot_ms"] for run in guests)
    first_ms = 1000 * statistics.median(firsts)
    print(f"VMM start -> init's first output: {first_ms:.0f} ms (goal <= 150 ms: {'ok' if first_ms <= 150 else 'MISSED'})")
    print(f"kernel boot clock at init: {kernel_ms:.0f} ms; VMM start -> power-off: {1000 * statistics.median(offs):.0f} ms")


if __name__ == "__main__":
    main()
