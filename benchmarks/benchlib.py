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


MemorySample = tuple[dict[str, int], tuple[int, int]]


def memory_sample() -> MemorySample:
    """The process's smaps_rollup, and Rss and Anonymous of its snapshot-image
    (memory.bin) mappings: the guest pages its VMs touched."""
    return rollup(), mapping_rss("memory.bin")


def per_vm(before: MemorySample, after: MemorySample, count: int) -> dict[str, float]:
    """Between two memory_sample()s around starting `count` VMs, per VM: the
    Rss delta, the guest pages touched, of them the private (copy-on-write)
    copies, the Rss beyond those pages, and the Anonymous delta."""
    (rollup_before, (guest_before, cow_before)), (rollup_after, (guest_after, cow_after)) = before, after
    delta = rollup_after["Rss"] - rollup_before["Rss"]
    touched = guest_after - guest_before
    return {
        "vms": count,
        "rss_delta": delta / count,
        "touched": touched / count,
        "cow": (cow_after - cow_before) / count,
        "beyond": (delta - touched) / count,
        "anon_delta": (rollup_after["Anonymous"] - rollup_before["Anonymous"]) / count,
    }


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
