"""``CoreCounters``: the running totals of one cache's books (``stats()``'s top-level counts).

Stores, lookups and their L1 and per-tier hits, retrieves and failed retrieves, each updated in
one short locked step by the call that caused it. Prometheus metrics are separate
(:mod:`gpukv.engine.observe`); these are the plain numbers tests, ``/status`` and ``stats()`` read.
"""

from __future__ import annotations

import threading


class CoreCounters:
    """Thread-safe counters (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict(stored_chunks=0, lookups=0, hit_chunks_l1=0, retrieved_chunks=0,
                            failed_retrieves=0)
        self._tier_hits: dict[str, int] = {}

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def lookup(self, l1_chunks: int, tier_chunks: dict[str, int] | None) -> None:
        """One lookup: ``l1_chunks`` hit in L1, ``tier_chunks`` per tier name."""
        with self._lock:
            self._counts["lookups"] += 1
            self._counts["hit_chunks_l1"] += l1_chunks
            for name, n in (tier_chunks or {}).items():
                self._tier_hits[name] = self._tier_hits.get(name, 0) + n

    def snapshot(self) -> dict:
        """The counts, and ``hit_chunks_tier`` per tier name (copies)."""
        with self._lock:
            return dict(self._counts, hit_chunks_tier=dict(self._tier_hits))
