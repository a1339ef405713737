"""Where a CPU copy benchmark's memory lives: cache-resident or DRAM-resident.

A copy measured on a pool that fits in the last-level cache reports the cache's speed, not the
memory's: an engine's KV cache is gigabytes. A *DRAM-resident* point therefore spreads its calls
over ``K`` disjoint sets of pages and ``K`` arena windows, ``K`` x the bytes of one call >=
max(1 GiB, 8 x the last-level cache): each call touches memory that the previous ``K - 1`` calls
did not, so it comes from DRAM. A *cache-resident* point reuses one set (``K = 1``), as the
earlier sweeps did. Every sweep reports both, labelled.
"""

from __future__ import annotations

import glob
import os

GIB = 1 << 30


def llc_bytes() -> int:
    """The largest CPU cache (bytes) sysfs reports for cpu0 (0 when it reports none)."""
    best = 0
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            best = max(best, int(digits) * scale)
    return best


def dram_bytes() -> int:
    """Bytes a DRAM-resident point spreads its calls over: max(1 GiB, 8 x LLC), or
    ``$GPUKV_DRAM_POOL_BYTES`` when set (e.g. a smaller machine; printed either way)."""
    forced = os.environ.get("GPUKV_DRAM_POOL_BYTES")
    return int(forced) if forced else max(GIB, 8 * llc_bytes())


def num_sets(pool: str, call_bytes: int) -> int:
    """How many disjoint sets a point of ``pool`` ("cache" or "dram") cycles through."""
    if pool == "cache":
        return 1
    if pool != "dram":
        raise ValueError(f"pool must be 'cache' or 'dram', got {pool!r}")
    return max(2, -(-dram_bytes() // call_bytes))


class Rotation:
    """Hands out 0, 1, ..., k - 1, 0, ... : the set each successive call uses."""

    def __init__(self, k: int) -> None:
        self.k, self._i = k, -1

    def __call__(self) -> int:
        self._i = (self._i + 1) % self.k
        return self._i


def describe() -> str:
    llc = llc_bytes()
    return (f"last-level cache {llc / 2**20:.0f} MiB; DRAM-resident points spread each point's "
            f"calls over {dram_bytes() / GIB:.2f} GiB of pages and as much arena")
