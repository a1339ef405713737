"""The tiers below L1 (disk, then remote) and what moves between them and L1.

``TierStack`` owns the tier objects, the spill of freshly stored chunks down to them
(:class:`gpukv.engine.spill.Spiller`) and the loads that extend a lookup's L1 prefix from them
(:class:`gpukv.engine.loader.TierLoader`), and flushes and closes them in order. With no tier
configured it is empty and every method is a no-op.
"""

from __future__ import annotations

import time
from typing import Callable

from gpukv.config import EngineConfig
from gpukv.engine.keys import KeySpace
from gpukv.engine.loader import TierLoader
from gpukv.engine.observe import Observer
from gpukv.engine.spill import Spiller
from gpukv.l1 import L1Manager


class TierStack:
    """The lower tiers of one cache (see the module docstring)."""

    def __init__(self, config: EngineConfig, l1: L1Manager, observer: Observer,
                 device_of: Callable[[KeySpace], int]) -> None:
        self.tiers: list = _make_tiers(config, observer)
        self.spiller: Spiller | None = Spiller(l1, self.tiers) if self.tiers else None
        self.loader = TierLoader(l1, self.tiers, budget_s=config.remote_timeout_s, device_of=device_of)

    def __bool__(self) -> bool:
        return bool(self.tiers)

    def spill(self, handles: list, space: KeySpace, fingerprint: str) -> None:
        """Queue freshly stored, ready L1 objects for every tier (off the hot path)."""
        if handles and self.spiller is not None:
            self.spiller.spill(handles, space, fingerprint)

    @property
    def queue_depth(self) -> int | None:
        return self.spiller.queue_depth if self.spiller is not None else None

    def stats(self) -> dict:
        """Per tier name, its own counters."""
        return {t.name: t.stats() for t in self.tiers}

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every spilled chunk has reached every tier; False on timeout."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        ok = self.spiller.flush(timeout_s) if self.spiller is not None else True
        for tier in self.tiers:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ok = tier.flush(left) and ok
        return ok

    def close(self, timeout_s: float) -> None:
        """Flush, then stop the spill thread and every tier, all within ``timeout_s`` (what is
        still queued after it is dropped, counted)."""
        deadline = time.monotonic() + timeout_s
        if self.tiers:
            self.flush(timeout_s)
        if self.spiller is not None:
            self.spiller.close(max(0.1, deadline - time.monotonic()))
        for tier in self.tiers:
            tier.close(max(0.1, deadline - time.monotonic()))


def _make_tiers(config: EngineConfig, observer: Observer) -> list:
    tiers = []
    events = observer.events is not None
    if config.disk_dir is not None:
        from gpukv.tiers.disk import DiskTier

        tiers.append(DiskTier(config.disk_dir, capacity_bytes=config.disk_capacity_bytes,
                              on_event=observer.tier_event("disk") if events else None))
    if config.remote_url is not None:
        from gpukv.tiers.remote import RemoteTier

        tiers.append(RemoteTier(config.remote_url, timeout_s=config.remote_timeout_s,
                                on_event=observer.tier_event("remote") if events else None))
    return tiers
