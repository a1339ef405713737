"""The open sessions of a ``gpukv serve`` process, by id, and closing (reaping) them.

A session is a client's random secret (never echoed back, never in a message), created by the
first frame that names it. Its instances are namespaced by the session; its requests by its
*group* (a second secret that the processes of one engine share, default: the session itself), so
a scheduler's lookup and its workers' retrieves meet, and no other session can retrieve with,
release or learn about them. Error messages show only the caller's own ids (:class:`Scoped`
prints just the id).

Invariants: a session is in the table until it is closed, and closing is one step under
:attr:`SessionTable.lock`, so a handler still running finds it closed and adds nothing to it.
Every field of a :class:`Session` changes only under that lock (the plan book and the handlers
take the same lock: one lock, one order).
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Hashable

from gpukv.frontend.session import Scoped, Session


class SessionTable:
    """Sessions by id (thread-safe through :attr:`lock`)."""

    def __init__(self, worker_timeout_s: float) -> None:
        self.lock = threading.Lock()
        self.worker_timeout_s = worker_timeout_s
        self._sessions: dict[str, Session] = {}
        self.reaped = 0  # sessions closed so far

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, sid: str) -> bool:
        return sid in self._sessions

    def touch(self, sid: str, group: str | None, pid: int | None = None) -> None:
        """Mark ``sid`` alive now (a new id starts a new, empty session), its frame from process
        ``pid`` as the server observed it (None: unknown). ValueError if the session named
        another group before (nothing changes)."""
        with self.lock:
            entry = self._sessions.get(sid)
            if entry is None:
                entry = self._sessions[sid] = Session(sid, group or sid, time.monotonic())
            elif entry.group != (group or sid):
                raise ValueError("this session belongs to another group: use a new client")
            else:
                entry.last_seen = time.monotonic()
            entry.peers.observe(pid)

    def get(self, sid: str) -> Session:
        """The open session ``sid``; ValueError (the reaped message) if there is none."""
        with self.lock:
            entry = self._sessions.get(sid)
        if entry is None:
            raise self.reaped_error()
        return entry

    def sids(self) -> list[str]:
        with self.lock:
            return list(self._sessions)

    def idle(self, cutoff: float) -> list[str]:
        """Sessions last seen before ``cutoff``."""
        with self.lock:
            return [sid for sid, s in self._sessions.items() if s.last_seen < cutoff]

    def close_locked(self, sid: str) -> Session | None:
        """Remove ``sid`` and mark it closed (caller holds :attr:`lock`); None if it is gone."""
        entry = self._sessions.pop(sid, None)
        if entry is not None:
            entry.closed = True
            self.reaped += 1
        return entry

    def instance(self, s: Session, instance_id: Hashable) -> Scoped:
        """The scoped key of ``s``'s instance ``instance_id``; ValueError if not registered."""
        with self.lock:
            key = s.instances.get(instance_id)
        if key is None:
            raise ValueError(f"unknown instance {instance_id!r} for this client: REGISTER it first")
        return key

    def forget_request(self, owner: Scoped, *sids: Hashable) -> None:
        """Drop ``owner`` from the open requests of the sessions ``sids`` (those still open)."""
        with self.lock:
            for sid in sids:
                entry = self._sessions.get(sid)
                if entry is not None:
                    entry.requests.discard(owner)

    def prune_requests(self, is_open: Callable[[Scoped], bool]) -> None:
        """Forget, in every session, the requests that are no longer open in the books."""
        with self.lock:
            for s in self._sessions.values():
                s.requests = {owner for owner in s.requests if is_open(owner)}

    def totals(self) -> dict:
        """Sessions, their open requests and plans, and the sessions closed so far."""
        with self.lock:
            sessions = self._sessions.values()
            return dict(sessions=len(self._sessions), reaped=self.reaped,
                        requests=sum(len(x.requests) for x in sessions),
                        plans=sum(len(x.plans) for x in sessions))

    def reaped_error(self) -> ValueError:
        return ValueError(f"this client's session was reaped (no ping for "
                          f"{self.worker_timeout_s} s): register again")
