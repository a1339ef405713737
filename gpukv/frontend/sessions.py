"""Client sessions of a ``gpukv serve`` process: the table, the plans in flight, the handlers,
and reaping, put together.

- :mod:`gpukv.frontend.session_table`: the open sessions (identities, groups) and closing them;
- :mod:`gpukv.frontend.plans`: plan ids and the plans each session holds, reserved bytes;
- :mod:`gpukv.frontend.orphans`: the plans of reaped sessions, held until their worker is gone;
- :mod:`gpukv.frontend.handlers`: what each request does to the books.

Reaping. A session silent for the worker timeout is reaped: its requests end, its instances are
unregistered; its open plans are *orphaned*, not released: the slots stay out of circulation
until the worker's process is gone (as the server observed it, never as the client said), because
a stalled worker that wakes up would otherwise copy into slots handed to someone else.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from gpukv.engine.core import CacheCore
from gpukv.frontend.handlers import Handlers
from gpukv.frontend.plans import PlanBook
from gpukv.frontend.session import Limits
from gpukv.frontend.session_table import SessionTable

log = logging.getLogger(__name__)

__all__ = ["Limits", "Sessions"]


class Sessions:
    """Client sessions and the core calls of every request type (thread-safe)."""

    def __init__(self, core: CacheCore, *, worker_timeout_s: float = 30.0,
                 limits: Limits | None = None, orphan_hold_s: float = 600.0,
                 check_holes: bool = True) -> None:
        self.core = core
        self.worker_timeout_s = worker_timeout_s
        self.orphan_hold_s = orphan_hold_s
        self.limits = limits or Limits()
        if self.limits.max_reserved_bytes is None:
            self.limits.max_reserved_bytes = core.config.capacity_bytes // 2
        self.table = SessionTable(worker_timeout_s, self.limits)
        self.plans = PlanBook(core, self.table, self.limits)
        self.handlers = Handlers(core, self.table, self.plans, self.limits,
                                 check_holes=check_holes)

    @property
    def orphans(self):
        return self.plans.orphans

    @property
    def num_sessions(self) -> int:
        """Client sessions alive now (the ``gpukv_connected_clients`` gauge)."""
        return len(self.table)

    def touch(self, sid: str, group: str | None, pid: int | None = None) -> None:
        """Mark ``sid`` alive now, its frame from process ``pid`` as observed (see
        :meth:`SessionTable.touch`)."""
        self.table.touch(sid, group, pid)

    def handle(self, sid: str, body) -> Any:
        """Run one decoded request body for session ``sid``; its return value is the reply."""
        s = self.table.enter(sid)
        try:
            return self.handlers(s, body)
        finally:
            self.table.leave(s)

    # ---- reaping -----------------------------------------------------------------------------
    def reap_idle(self, cutoff: float) -> list[str]:
        """Reap every session last seen before ``cutoff``; returns their ids. Also releases
        orphaned plans whose worker is gone, and forgets requests whose lease passed."""
        idle = self.table.idle(cutoff)
        for sid in idle:
            self.reap(sid)
        if idle and self.core.observer.metrics is not None:
            self.core.observer.metrics.client_reaped(len(idle))
        self.plans.release_due()
        self.table.prune_requests(lambda owner: owner in self.core.requests)
        return idle

    def reap(self, sid: str) -> int:
        """End a session: its requests end, its instances are unregistered, its plans are
        orphaned (see the module docstring). Returns the shares released."""
        with self.table.lock:  # one step: a handler still running sees it closed, adds nothing
            s = self.table.close_locked(sid)
            if s is None:
                return 0
            requests, instances = list(s.requests), list(s.instances.values())
            orphaned = self.plans.orphan_locked(s, self.orphan_hold_s)
        released = sum(self.core.end_request(owner) for owner in requests)
        for key in instances:
            with contextlib.suppress(ValueError):  # a register in flight undoes itself
                self.core.unregister(key)
        log.info("reaped a client: %d shares of %d requests released, %d instances dropped, "
                 "%d plans orphaned", released, len(requests), len(instances), orphaned)
        self.plans.release_due()
        return released

    def close(self) -> None:
        for sid in self.table.sids():
            self.reap(sid)
        self.plans.release_all()
