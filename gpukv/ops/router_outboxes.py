"""The engines' share of the vLLM-format events (:mod:`gpukv.ops.router_events`): one bounded
outbox of encoded events per engine group that asked for them, drained by its ``VLLM_BLOCKS``
calls (its connector republishes them through vLLM's own publisher).

Each outbox keeps at most ``size`` events (the oldest dropped, counted) and when it was last
drained: an engine that stopped draining for ``stale_s`` no longer owns its blocks (the next
engine that describes them does). Thread-safe: the translator's thread pushes, request handlers
drain.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Callable

MAX_REPLY_BYTES = 4 << 20  # events one VLLM_BLOCKS reply carries at most


class _Outbox:
    def __init__(self, size: int, now: float) -> None:
        self.events: collections.deque[bytes] = collections.deque(maxlen=size)
        self.taken_at = now
        self.dropped = 0


class Outboxes:
    def __init__(self, size: int = 1 << 16, stale_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.size, self.stale_s, self.clock = size, stale_s, clock
        self._lock = threading.Lock()
        self._boxes: dict[str, _Outbox] = {}

    def take(self, owner: str, max_bytes: int = MAX_REPLY_BYTES) -> tuple[list[bytes], bool]:
        """Drain ``owner``'s oldest events, at most ``max_bytes`` of them (one at least), opening
        its outbox on the first call; returns ``(events, more)``."""
        out, size = [], 0
        with self._lock:
            box = self._boxes.get(owner)
            if box is None:
                box = self._boxes[owner] = _Outbox(self.size, self.clock())
            while box.events and (not out or size + len(box.events[0]) <= max_bytes):
                out.append(box.events.popleft())
                size += len(out[-1])
            box.taken_at = self.clock()
            return out, bool(box.events)

    def push(self, owner: str, events: list[bytes]) -> None:
        """Append to ``owner``'s outbox (nothing if it never drained one)."""
        with self._lock:
            box = self._boxes.get(owner)
            if box is None:
                return
            box.dropped += max(0, len(box.events) + len(events) - self.size)
            box.events.extend(events)

    def push_all(self, event: bytes) -> None:
        with self._lock:
            for box in self._boxes.values():
                box.events.append(event)

    def claimable(self, owner: str | None) -> bool:
        """Whether blocks ``owner`` announces may go to another engine (none, or gone stale)."""
        if owner is None:
            return True
        with self._lock:
            box = self._boxes.get(owner)
            return box is None or self.clock() - box.taken_at > self.stale_s

    @property
    def dropped(self) -> int:
        with self._lock:
            return sum(box.dropped for box in self._boxes.values())
