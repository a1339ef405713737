"""Orphaned plans: the open stores and retrieves of reaped sessions, held until their worker is gone.

A reaped session's worker may only be stalled, not dead: if it woke up, it would copy into the
slots its plans name. So those slots stay out of circulation (write reservations and pins kept)
until every process the session's frames came from no longer runs, as the server itself observed
them (:mod:`gpukv.frontend.liveness`: ``SO_PEERCRED`` on ipc://, never a pid the client reports);
for a session it could not attribute (tcp://, another pid namespace), for a fixed hold
(``gpukv serve --orphan-hold``). A late STORE_COMMIT / RETRIEVE_END of an orphaned plan
(the worker woke up and finished its copy) hands that plan back at once: the caller releases it
and fails the request, so nothing of it is committed.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from gpukv.engine.core import CacheCore
from gpukv.engine.grants import ReadGrant, WriteGrant
from gpukv.frontend.liveness import Peers

Plan = WriteGrant | ReadGrant


@dataclass(slots=True)
class _Orphaned:
    sid: str
    peers: Peers
    release_after: float  # for an unverified session
    plans: dict[int, Plan]
    owner: object  # who is charged for them until they are back (the session's client)


class Orphans:
    """Plans of reaped sessions by (session, plan id). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[_Orphaned] = []

    def add(self, sid: str, peers: Peers, hold_s: float, plans: dict[int, Plan],
            owner: object = None) -> None:
        """Hold ``plans`` of session ``sid`` (charged to ``owner``) until its processes
        ``peers`` are gone (verified), or for ``hold_s`` seconds (unverified)."""
        if plans:
            with self._lock:
                self._items.append(_Orphaned(sid, peers, time.monotonic() + hold_s, dict(plans),
                                             owner))

    def take(self, sid: str, plan_id: int, kind: type) -> tuple[object, Plan] | None:
        """Hand back orphaned plan ``plan_id`` of session ``sid`` if it is a ``kind``, with
        its owner."""
        with self._lock:
            for item in self._items:
                if isinstance(item.plans.get(plan_id), kind) and item.sid == sid:
                    plan = item.plans.pop(plan_id)
                    if not item.plans:
                        self._items.remove(item)
                    return item.owner, plan
        return None

    def due(self) -> list[tuple[object, Plan]]:
        """Hand back every plan whose worker is gone (or, unverified, whose hold passed), with
        its owner."""
        now = time.monotonic()
        with self._lock:
            done = [o for o in self._items
                    if o.peers.gone() or (o.peers.unverified and now >= o.release_after)]
            self._items = [o for o in self._items if o not in done]
        return [(o.owner, plan) for o in done for plan in o.plans.values()]

    def take_all(self) -> list[tuple[object, Plan]]:
        with self._lock:
            items, self._items = self._items, []
        return [(o.owner, plan) for o in items for plan in o.plans.values()]

    def __len__(self) -> int:
        with self._lock:
            return sum(len(o.plans) for o in self._items)


def release(core: CacheCore, plans: list[Plan]) -> None:
    """Give plans back to the books: a store's reservation discarded, a retrieve's pins dropped."""
    for plan in plans:
        if isinstance(plan, WriteGrant):
            core.abort_store(plan)
        else:
            core.l1.unpin(plan.handles)

