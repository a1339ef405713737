"""Stores and retrieves in flight: their plan ids, which session holds which, and the bytes a
session has reserved for its stores.

STORE_BEGIN and RETRIEVE_BEGIN hand the worker arena slots and keep the plan (its write
reservation, or its pins) in the session until STORE_COMMIT / RETRIEVE_END. Invariants:

- a plan id is unique server-wide and never reused, so a late call of a reaped client never
  names a plan of its new session;
- a plan is held in exactly one place -- its session's open plans, the orphans (its session was
  reaped: :mod:`gpukv.frontend.orphans`), or nowhere (given back to the books) -- so it is given
  back exactly once;
- a session's ``reserved_bytes`` is the bytes of its open store plans; its client's is the sum
  over the client's sessions plus the bytes of its orphaned store plans not given back yet (a
  process that goes silent keeps paying for the slots it may still write).

Every change happens under the session table's lock (the ``*_locked`` methods expect it held).
"""

from __future__ import annotations

import itertools

from gpukv.engine.core import CacheCore
from gpukv.engine.grants import ReadGrant, WriteGrant
from gpukv.errors import Busy
from gpukv.frontend.orphans import Orphans, release
from gpukv.frontend.session import Client, Limits, Session
from gpukv.frontend.session_table import SessionTable

Plan = WriteGrant | ReadGrant


def plan_bytes(plan: Plan) -> int:
    """Bytes a plan reserves for a store (a retrieve reserves none)."""
    return len(plan.handles) * plan.instance.chunk_bytes if isinstance(plan, WriteGrant) else 0


class PlanBook:
    """The open plans of every session, their ids, and the orphans of reaped sessions."""

    def __init__(self, core: CacheCore, table: SessionTable, limits: Limits) -> None:
        self.core, self.table, self.limits = core, table, limits
        self.orphans = Orphans()
        self._ids = itertools.count(1)  # server-wide: a reaped client's ids never recur

    def check_room(self, s: Session) -> None:
        """Busy when ``s`` has as many plans in flight as it may."""
        if len(s.plans) >= self.limits.max_plans:
            raise Busy(f"busy: this client has {len(s.plans)} stores/retrieves in flight, at most "
                       f"{self.limits.max_plans} (gpukv serve --max-plans)")

    def add_locked(self, s: Session, plan: Plan) -> int:
        """Keep ``plan`` in ``s`` (its bytes reserved); 0 when ``s`` was reaped meanwhile."""
        if s.closed:
            return 0
        plan_id = next(self._ids)
        s.plans[plan_id] = plan
        nbytes = plan_bytes(plan)
        s.reserved_bytes += nbytes
        s.client.reserved_bytes += nbytes
        return plan_id

    def take(self, s: Session, plan_id: int, kind: type) -> Plan:
        """Remove and return ``s``'s open plan ``plan_id`` (its bytes no longer reserved). A plan
        orphaned when this client's session was reaped is released now (its copy is over: the
        client sends a commit or end only then) and the call fails, so a late commit never makes
        anything readable."""
        with self.table.lock:
            if isinstance(s.plans.get(plan_id), kind):
                plan = s.plans.pop(plan_id)
                nbytes = plan_bytes(plan)
                s.reserved_bytes -= nbytes
                s.client.reserved_bytes -= nbytes
                return plan
        late = self.orphans.take(s.sid, plan_id, kind)
        if late is None:
            raise ValueError(f"no {kind.__name__} {plan_id} open for this client")
        self._give_back([late])
        raise ValueError(f"{kind.__name__} {plan_id} was dropped: this client's session was reaped "
                         f"(no ping for {self.table.worker_timeout_s} s); nothing was committed")

    def orphan_locked(self, s: Session, hold_s: float) -> int:
        """Move every open plan of the closed session ``s`` to the orphans (held while its
        processes run, or ``hold_s`` when it is unverified); returns how many."""
        plans, s.plans, s.reserved_bytes = s.plans, {}, 0  # the client still pays for them
        self.orphans.add(s.sid, s.peers, hold_s, plans, s.client)
        return len(plans)

    def release_due(self) -> None:
        """Give back the orphaned plans whose worker is gone."""
        self._give_back(self.orphans.due())

    def release_all(self) -> None:
        self._give_back(self.orphans.take_all())

    def _give_back(self, owned: list[tuple[Client, Plan]]) -> None:
        with self.table.lock:
            for client, plan in owned:
                client.reserved_bytes -= plan_bytes(plan)
                self.table.drop_if_idle_locked(client)
        release(self.core, [plan for _, plan in owned])
