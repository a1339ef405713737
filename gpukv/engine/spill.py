"""Background spill of freshly stored L1 chunks to the lower tiers (disk, remote).

The store path only finishes its L1 write and takes one read share per chunk for the spiller
(so the slot cannot be evicted or reused while it is copied); a worker thread copies each chunk
to host memory, hands it to every tier that lacks it, and releases the share. A full queue drops
the spill (counted): the chunk stays in L1, only the lower tiers miss it.
"""

from __future__ import annotations

import logging
import queue
import threading

from gpukv.l1 import L1Manager, Status

log = logging.getLogger(__name__)

SPILL_OWNER = ("gpukv", "spill")


class Spiller:
    """One thread that copies L1 chunks to CPU and submits them to each tier."""

    def __init__(self, l1: L1Manager, tiers: list, *, queue_size: int = 1024) -> None:
        self._l1 = l1
        self._tiers = tiers
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.dropped = 0
        self.spilled = 0
        self._thread = threading.Thread(target=self._loop, name="gpukv-spill", daemon=True)
        self._thread.start()

    def spill(self, keys: list, fingerprint: str, *, owner) -> None:
        """Finish ``owner``'s writes of ``keys`` and queue them for the tiers."""
        statuses = self._l1.finish_write(keys, owner=owner)
        assert all(s is Status.OK for s in statuses), statuses
        # Not atomic with finish_write: a key evicted in between just gets NOT_FOUND, never
        # another object's bytes.
        statuses = self._l1.reserve_read(keys, 0, owner=SPILL_OWNER)
        locked = [k for k, s in zip(keys, statuses) if s is Status.OK]
        if not locked:
            return
        try:
            self._queue.put_nowait((locked, fingerprint))
        except queue.Full:
            self._l1.finish_read(locked, 0, owner=SPILL_OWNER)
            self.dropped += len(locked)
            log.warning("spill queue full: %d chunks not spilled to lower tiers", len(locked))

    def flush(self, timeout_s: float | None = None) -> bool:
        done = threading.Event()
        self._queue.put((None, done))
        return done.wait(timeout_s)

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            keys, fingerprint = item
            if keys is None:
                fingerprint.set()
                continue
            names = [k.to_str() for k in keys]
            held = [t.contains_many(names) for t in self._tiers]  # one round trip per tier
            for i, key in enumerate(keys):
                try:
                    self._spill_one(key, names[i], [t for t, h in zip(self._tiers, held) if not h[i]],
                                    fingerprint)
                finally:
                    self._l1.finish_read([key], 0, owner=SPILL_OWNER)

    def _spill_one(self, key, key_str: str, todo: list, fingerprint: str) -> None:
        if not todo:
            return
        payload = self._l1.buffer(key).to("cpu", copy=True)
        for tier in todo:
            tier.submit(key_str, fingerprint, payload)
        self.spilled += 1
