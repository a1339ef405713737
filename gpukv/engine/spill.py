"""Background spill of freshly stored L1 chunks to the lower tiers (disk, remote).

The store path pins each new object (``pin_handles``: a pin, not a share, so no reader count
changes) and queues it; one thread copies it to host memory, hands it to every tier that lacks
it, and unpins. A full queue drops the spill (counted): the chunk stays in L1, only the lower tiers
miss it. A failure with one chunk (a tier or the copy raising) is logged, counted in ``errors``
and that chunk unpinned; the thread goes on.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass

from gpukv.engine.keys import KeySpace
from gpukv.l1 import L1Manager, Status
from gpukv.l1.entry import Entry

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Batch:
    handles: list[Entry]
    space: KeySpace
    fingerprint: str


class Spiller:
    """One thread that copies pinned L1 chunks to CPU and submits them to each tier."""

    def __init__(self, l1: L1Manager, tiers: list, *, queue_size: int = 1024) -> None:
        self._l1 = l1
        self._tiers = tiers
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending = 0  # chunks queued or being spilled
        self.counts = dict(spilled=0, dropped=0, errors=0)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gpukv-spill", daemon=True)
        self._thread.start()

    def spill(self, handles: list[Entry], space: KeySpace, fingerprint: str) -> int:
        """Pin and queue ready objects for the tiers; returns how many were queued."""
        pinned = [h for h, s in zip(handles, self._l1.pin_handles(handles)) if s is Status.OK]
        if not pinned:
            return 0
        with self._lock:
            self._pending += len(pinned)
        try:
            if self._closed.is_set():
                raise queue.Full
            self._queue.put_nowait(_Batch(pinned, space, fingerprint))
        except queue.Full:
            self._l1.unpin(pinned)
            self._done(len(pinned), dropped=len(pinned))
            log.warning("spill queue full: %d chunks not spilled to lower tiers", len(pinned))
            return 0
        return len(pinned)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every chunk queued before the call has been spilled; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout=timeout_s)

    @property
    def queue_depth(self) -> int:
        return self._pending

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the thread; chunks still queued after ``timeout_s`` are dropped (and unpinned)."""
        self._closed.set()
        self._thread.join(timeout=timeout_s)
        while True:
            try:
                batch = self._queue.get_nowait()
            except queue.Empty:
                break
            self._l1.unpin(batch.handles)
            self._done(len(batch.handles), dropped=len(batch.handles))

    def _loop(self) -> None:
        while not self._closed.is_set():
            try:
                batch = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            names = [batch.space.tier_key(h.key) for h in batch.handles]
            held = []
            for tier in self._tiers:
                try:
                    held.append(tier.contains_many(names))  # one round trip per tier
                except Exception:  # noqa: BLE001 - a tier failing must not stop the spill
                    log.warning("spill: %s contains_many failed", tier.name, exc_info=True)
                    held.append([False] * len(names))
            for i, handle in enumerate(batch.handles):
                try:
                    todo = [t for t, h in zip(self._tiers, held) if not h[i]]
                    if todo:
                        self._spill_one(handle, names[i], todo, batch.fingerprint)
                    self._done(0, spilled=1)
                except Exception:  # noqa: BLE001 - one chunk's failure is counted, not fatal
                    self._done(0, errors=1)
                    log.warning("spill of %s failed", names[i], exc_info=True)
                finally:
                    self._l1.unpin([handle])
                    self._done(1)

    def _spill_one(self, handle: Entry, name: str, todo: list, fingerprint: str) -> None:
        arena = self._l1.arena(handle.device)
        payload = arena[handle.offset:handle.offset + handle.nbytes].to("cpu", copy=True)
        for tier in todo:
            tier.submit(name, fingerprint, payload)

    def _done(self, num: int, **counts: int) -> None:
        with self._idle:
            for name, value in counts.items():
                self.counts[name] += value
            self._pending -= num
            if self._pending == 0:
                self._idle.notify_all()

