"""Who gives way when the server-wide request table is full: no client can starve another.

Each session may open up to ``max_open_requests`` requests, and the books hold at most
``max_requests`` (``EngineConfig``) of them together, so a few sessions could fill the table and
every other session's LOOKUP would be ``Busy`` until their read leases passed. Instead, a session
that opens a request while the table is full and holds fewer than its fair share (the table's
size over the sessions holding requests, itself included) ends the oldest request of the session
holding the most: that one holds more than the fair share, since the table is full. Ending a
request only releases its reader shares (a copy in flight keeps its own pins), so the session
that gives way loses a cache hit, never bytes: its retrieve of that request fails cleanly. A
session at or above its fair share gets ``Busy``.
"""

from __future__ import annotations

import logging

from gpukv.engine.core import CacheCore
from gpukv.frontend.session import Scoped, Session
from gpukv.frontend.session_table import SessionTable

log = logging.getLogger(__name__)

MAX_STALE = 8  # requests tried per call that had already ended (their lease passed)


class RequestShares:
    """Makes room in a full request table for a session below its fair share."""

    def __init__(self, core: CacheCore, table: SessionTable) -> None:
        self.core, self.table = core, table
        self.preempted = 0  # requests ended to make room for another session's

    def make_room(self, s: Session) -> bool:
        """End the oldest request of the session holding the most, if ``s`` holds less than
        its fair share; True when a request really ended (the caller retries its lookup)."""
        for _ in range(MAX_STALE):
            owner = self._pick(s)
            if owner is None:
                return False
            if owner in self.core.requests:
                self.core.end_request(owner)
                self.preempted += 1
                log.info("request table full: ended the oldest request of the session holding "
                         "the most, for a session below its fair share")
                return True
        return False

    def _pick(self, s: Session) -> Scoped | None:
        with self.table.lock:
            holding = [x for x in self.table.sessions_locked() if x.requests]
            share = self.core.config.max_requests / (len(holding) + (not s.requests))
            if len(s.requests) >= share:
                return None
            biggest = max(holding, key=lambda x: len(x.requests), default=None)
            if biggest is None or biggest is s:
                return None
            owner = next(iter(biggest.requests))
            del biggest.requests[owner]
            return owner
