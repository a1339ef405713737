"""Orphaned plans: the open stores and retrieves of reaped sessions, held until their worker is gone.

A reaped session's worker may only be stalled, not dead: if it woke up, it would copy into the
slots its plans name. So those slots stay out of circulation (write reservations and pins kept)
until the worker's process no longer runs (its pid, told at PING), or, for a client that never
told its pid, one more worker timeout. A late STORE_COMMIT / RETRIEVE_END of an orphaned plan
(the worker woke up and finished its copy) hands that plan back at once: the caller releases it
and fails the request, so nothing of it is committed.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from gpukv.engine.core import CacheCore, RetrievePlan, StorePlan

Plan = StorePlan | RetrievePlan


@dataclass(slots=True)
class _Orphaned:
    sid: str
    pid: int | None
    release_after: float
    plans: dict[int, Plan]


class Orphans:
    """Plans of reaped sessions by (session, plan id). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[_Orphaned] = []

    def add(self, sid: str, pid: int | None, grace_s: float, plans: dict[int, Plan]) -> None:
        """Hold ``plans`` of session ``sid`` until process ``pid`` is gone and ``grace_s`` passed."""
        if plans:
            with self._lock:
                self._items.append(_Orphaned(sid, pid, time.monotonic() + grace_s, dict(plans)))

    def take(self, sid: str, plan_id: int, kind: type) -> Plan | None:
        """Hand back orphaned plan ``plan_id`` of session ``sid`` if it is a ``kind``."""
        with self._lock:
            for item in self._items:
                if isinstance(item.plans.get(plan_id), kind) and item.sid == sid:
                    plan = item.plans.pop(plan_id)
                    if not item.plans:
                        self._items.remove(item)
                    return plan
        return None

    def due(self) -> list[Plan]:
        """Hand back every plan whose worker is gone (and whose grace passed)."""
        now = time.monotonic()
        with self._lock:
            done = [o for o in self._items if now >= o.release_after and not alive(o.pid)]
            self._items = [o for o in self._items if o not in done]
        return [plan for o in done for plan in o.plans.values()]

    def take_all(self) -> list[Plan]:
        with self._lock:
            items, self._items = self._items, []
        return [plan for o in items for plan in o.plans.values()]

    def __len__(self) -> int:
        with self._lock:
            return sum(len(o.plans) for o in self._items)


def release(core: CacheCore, plans: list[Plan]) -> None:
    """Give plans back to the books: a store's reservation discarded, a retrieve's pins dropped."""
    for plan in plans:
        if isinstance(plan, StorePlan):
            core.abort_store(plan)
        else:
            core.l1.unpin(plan.handles)


def alive(pid: int | None) -> bool:
    """Whether process ``pid`` still runs (a zombie, dead but not yet waited for, does not)."""
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2:][:1] not in (b"Z", b"X")
