"""What the benchmarks share: percentiles, and the process memory figures
(/proc/self/smaps_rollup and the resident pages of the snapshot-image
mappings, the guest pages a VM touched), so "host RSS beyond touched guest
pages" means one thing in every benchmark."""

from __future__ import annotations

from pathlib import Path


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def rollup() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        out[key] = int(value.split()[0]) * 1024
    return out


def mapping_rss(name: str) -> tuple[int, int]:
    """Rss and Anonymous (the COW copies) over mappings whose path ends in `name`."""
    rss = anon = 0
    current = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            current = line.rstrip().endswith(name)
        elif current and line.startswith("Rss:"):
            rss += int(head[1]) * 1024
        elif current and line.startswith("Anonymous:"):
            anon += int(head[1]) * 1024
    return rss, anon
