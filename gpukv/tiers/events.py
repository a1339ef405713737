"""Tier events: what became readable in a tier and what left it, for KV-event subscribers.

A tier built with ``on_event`` calls ``on_event(event, key, reason)`` with

    event   "stored"   the object became readable in this tier (reason "written", or "restart"
                       for each object a tier found at start-up, so a subscriber can rebuild)
            "removed"  it left this tier (reason "evicted", "corrupt", "tier_error", "cleared",
                       "expired")
    key     the tier's opaque key string

Replaying the events in order gives exactly the set of keys the tier holds (for the Redis tier:
the keys this instance wrote, less those it deleted; see ``gpukv.tiers.remote``).

Delivery: from whatever thread made the change, never while a tier lock is held, so the callback
may call the tier. Events are recorded under the tier's lock (their order is the order of the
changes) and delivered in that order; a thread that finds another thread delivering leaves its
events to it instead of waiting, so a slow callback never blocks a caller of another thread. A
callback that raises is logged (rate-limited) and counted in ``errors``; the tier goes on.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Callable

from gpukv.tiers.ratelimit import RateLimitedLog

log = logging.getLogger(__name__)

EventCallback = Callable[[str, str, str], None]
STORED = "stored"
REMOVED = "removed"
STORED_REASONS = frozenset({"written", "restart"})
REMOVED_REASONS = frozenset({"evicted", "corrupt", "tier_error", "cleared", "expired"})


class TierEvents:
    """Ordered, lock-free-for-callers delivery of one tier's events to ``callback``."""

    def __init__(self, callback: EventCallback | None, tier_name: str) -> None:
        if callback is not None and not callable(callback):
            raise TypeError(f"on_event must be callable or None, got {type(callback).__name__}")
        self._callback = callback
        self._pending: deque[tuple[str, str, str]] = deque()
        self._delivering = threading.Lock()
        self._warn = RateLimitedLog(log, f"{tier_name} tier events: ")
        self.errors = 0

    @property
    def enabled(self) -> bool:
        return self._callback is not None

    def record(self, event: str, key: str, reason: str) -> None:
        """Queue one event; call it under the tier lock that orders the change it reports."""
        if self._callback is None:
            return
        valid = STORED_REASONS if event == STORED else REMOVED_REASONS if event == REMOVED else ()
        assert reason in valid, (event, reason)
        self._pending.append((event, key, reason))

    def deliver(self) -> None:
        """Deliver queued events in order; call it with no tier lock held."""
        while self._pending:
            if not self._delivering.acquire(blocking=False):
                return  # the delivering thread takes ours too (it re-checks after releasing)
            try:
                while self._pending:
                    event = self._pending.popleft()
                    try:
                        self._callback(*event)
                    except Exception as exc:  # a subscriber's bug must not break the tier
                        self.errors += 1
                        self._warn.warning("callback", f"on_event{event} raised "
                                           f"{type(exc).__name__}: {exc}", exc_info=exc)
            finally:
                self._delivering.release()
