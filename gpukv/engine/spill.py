"""Background spill of freshly stored L1 chunks to the lower tiers (disk, remote).

The store path pins each new object (``pin_handles``: a pin, not a share, so no reader count
changes) and queues it on a :class:`gpukv.tiers.writer.BackgroundWriter`; its thread asks each
tier once per batch which chunks it already holds, copies the others to host memory, hands them
to every tier that lacks them, and the writer's ``on_done``/``on_drop`` unpins each chunk exactly
once. A full queue drops the spill (counted): the chunk stays in L1, only the lower tiers miss
it. A failure with one chunk or one tier is logged, counted in ``errors`` and that chunk
unpinned; the thread goes on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from gpukv.engine.keys import KeySpace
from gpukv.l1 import L1Manager, Status
from gpukv.l1.entry import Entry
from gpukv.tiers.ratelimit import RateLimitedLog
from gpukv.tiers.writer import BackgroundWriter

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Chunk:
    handle: Entry
    name: str  # the tier key
    fingerprint: str


class Spiller:
    """Copies pinned L1 chunks to CPU and submits them to each tier, off the hot path."""

    def __init__(self, l1: L1Manager, tiers: list, *, queue_size: int = 1024,
                 queue_bytes: int | None = None) -> None:
        self._l1 = l1
        self._tiers = tiers
        self._warn = RateLimitedLog(log)
        self.counts = dict(spilled=0, dropped=0, errors=0)
        self._writer: BackgroundWriter[_Chunk] = BackgroundWriter(
            self._handle, name="gpukv-spill", max_items=queue_size, max_bytes=queue_bytes,
            batch_size=32, on_done=self._unpin, on_drop=self._dropped)

    def spill(self, handles: list[Entry], space: KeySpace, fingerprint: str) -> int:
        """Pin and queue ready objects for the tiers; returns how many were queued."""
        queued = 0
        for handle, status in zip(handles, self._l1.pin_handles(handles)):
            if status is Status.OK:
                queued += self._writer.submit(_Chunk(handle, space.tier_key(handle.key), fingerprint),
                                              handle.nbytes)
        return queued

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every chunk queued before the call has been spilled; False on timeout."""
        return self._writer.flush(timeout_s)

    @property
    def queue_depth(self) -> int:
        stats = self._writer.stats()
        return stats["queued"] + stats["in_flight"]

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the thread; chunks still queued are dropped (and unpinned)."""
        self._writer.close(timeout_s)

    def _handle(self, batch: list[_Chunk]) -> None:
        names = [c.name for c in batch]
        held = []
        for tier in self._tiers:
            try:
                held.append(tier.contains_many(names))  # one round trip per tier and batch
            except Exception as exc:  # noqa: BLE001 - a tier failing must not stop the spill
                self._warn.warning("contains", f"spill: {tier.name} contains_many failed",
                                   exc_info=exc)
                held.append([False] * len(names))
        for i, chunk in enumerate(batch):
            todo = [t for t, h in zip(self._tiers, held) if not h[i]]
            try:
                if todo:
                    handle = chunk.handle
                    arena = self._l1.arena(handle.device)
                    payload = arena[handle.offset:handle.offset + handle.nbytes].to("cpu", copy=True)
                    for tier in todo:
                        tier.submit(chunk.name, chunk.fingerprint, payload)
                self.counts["spilled"] += 1
            except Exception as exc:  # noqa: BLE001 - one chunk's failure is counted, not fatal
                self.counts["errors"] += 1
                self._warn.warning("spill", f"spill of {chunk.name} failed", exc_info=exc)

    def _unpin(self, chunk: _Chunk) -> None:
        self._l1.unpin([chunk.handle])

    def _dropped(self, chunk: _Chunk, reason: str) -> None:
        self._l1.unpin([chunk.handle])
        key = "errors" if reason == "error" else "dropped"
        self.counts[key] += 1
        if key == "dropped":
            self._warn.warning("drop", f"spill queue {reason}: a chunk was not spilled to lower tiers")
