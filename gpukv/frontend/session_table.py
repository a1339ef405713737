"""The open sessions of a ``gpukv serve`` process, by id, and closing (reaping) them.

A session is a client's random secret (never echoed back, never in a message), created by the
first frame that names it. Its instances are namespaced by the session; its requests by its
*group* (a second secret that the processes of one engine share, default: the session itself), so
a scheduler's lookup and its workers' retrieves meet, and no other session can retrieve with,
release or learn about them. Error messages show only the caller's own ids (:class:`Scoped`
prints just the id).

Invariants: a session is in the table until it is closed, and closing is one step under
:attr:`SessionTable.lock`, so a handler still running finds it closed and adds nothing to it.
Every field of a :class:`Session` or :class:`Client` changes only under that lock (the plan book
and the handlers take the same lock: one lock, one order).

Bounds: sessions cost memory and anyone who can connect can invent them, so there are at most
``max_sessions`` (server-wide) and ``max_sessions_per_process`` (per client process, as the
server observed it). A new session past a bound first closes the least recently seen *empty*
session (no instances, requests or plans, no request running: its client loses nothing, and its
next frame opens a fresh one); only when none is empty is the new session refused (``Busy``).
A client (:class:`Client`) lives while it has sessions or bytes still reserved.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Callable, Hashable

from gpukv.errors import Busy
from gpukv.frontend.liveness import Peers
from gpukv.frontend.session import Client, Limits, Scoped, Session


class SessionTable:
    """Sessions by id, least recently seen first, and their clients (thread-safe through
    :attr:`lock`)."""

    def __init__(self, worker_timeout_s: float, limits: Limits | None = None) -> None:
        self.lock = threading.Lock()
        self.worker_timeout_s = worker_timeout_s
        self.limits = limits or Limits()
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._clients: dict[Hashable, Client] = {}
        self.reaped = 0  # sessions closed for silence (or at shutdown)
        self.evicted = 0  # empty sessions closed to make room for new ones

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, sid: str) -> bool:
        return sid in self._sessions

    def touch(self, sid: str, group: str | None, pid: int | None = None) -> None:
        """Mark ``sid`` alive now (a new id starts a new, empty session), its frame from process
        ``pid`` as the server observed it (None: unknown). ValueError if the session named
        another group before, Busy if it is new and no room can be made (nothing changes)."""
        with self.lock:
            entry = self._sessions.get(sid)
            if entry is None:
                entry = self._open_locked(sid, group or sid, pid)
            elif entry.group != (group or sid):
                raise ValueError("this session belongs to another group: use a new client")
            else:
                entry.last_seen = time.monotonic()
                self._sessions.move_to_end(sid)
                entry.client.sessions.move_to_end(sid)
            entry.peers.observe(pid)

    def _open_locked(self, sid: str, group: str, pid: int | None) -> Session:
        peers = Peers()
        peers.observe(pid)
        key = peers.main or ("session", sid)
        client = self._clients.get(key)
        limits = self.limits
        if client is not None and len(client.sessions) >= limits.max_sessions_per_process:
            self._make_room_locked(client.sessions, f"this client process has "
                                   f"{len(client.sessions)} sessions, at most "
                                   f"{limits.max_sessions_per_process} (gpukv serve "
                                   "--max-sessions-per-process)")
        if len(self._sessions) >= limits.max_sessions:
            self._make_room_locked(self._sessions, f"{len(self._sessions)} client sessions are "
                                   f"open, at most {limits.max_sessions} (gpukv serve "
                                   "--max-sessions)")
        client = self._clients.get(key)  # (closing an empty session may have dropped it)
        if client is None:
            client = self._clients[key] = Client(key)
        entry = self._sessions[sid] = Session(sid, group, time.monotonic(), client, peers)
        client.sessions[sid] = None
        return entry

    def _make_room_locked(self, sids, why: str) -> None:
        """Close the least recently seen empty session among ``sids``; Busy if none is empty."""
        for sid in sids:
            if self._sessions[sid].empty:
                self.close_locked(sid)
                self.reaped -= 1
                self.evicted += 1
                return
        raise Busy(f"busy: {why}; end some clients first")

    def get(self, sid: str) -> Session:
        """The open session ``sid``; ValueError (the reaped message) if there is none."""
        with self.lock:
            entry = self._sessions.get(sid)
        if entry is None:
            raise self.reaped_error()
        return entry

    def enter(self, sid: str) -> Session:
        """:meth:`get`, counting a request running in it until :meth:`leave` (it is not empty
        meanwhile, so no new session closes it)."""
        with self.lock:
            entry = self._sessions.get(sid)
            if entry is not None:
                entry.active += 1
        if entry is None:
            raise self.reaped_error()
        return entry

    def leave(self, s: Session) -> None:
        with self.lock:
            s.active -= 1

    def sids(self) -> list[str]:
        with self.lock:
            return list(self._sessions)

    def sessions_locked(self):
        """The open sessions, least recently seen first (caller holds :attr:`lock`)."""
        return self._sessions.values()

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
            entry.client.sessions.pop(sid, None)
            self.drop_if_idle_locked(entry.client)
        return entry

    def drop_if_idle_locked(self, client: Client) -> None:
        """Forget ``client`` once it has no session and no reserved bytes."""
        if not client.sessions and not client.reserved_bytes:
            if self._clients.get(client.key) is client:
                del self._clients[client.key]

    def client_of(self, key: Hashable) -> Client | None:
        with self.lock:
            return self._clients.get(key)

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
                    entry.requests.pop(owner, None)

    def prune_requests(self, is_open: Callable[[Scoped], bool]) -> None:
        """Forget, in every session, the requests that are no longer open in the books."""
        with self.lock:
            for s in self._sessions.values():
                s.requests = {owner: None for owner in s.requests if is_open(owner)}

    def totals(self) -> dict:
        """Sessions, their open requests and plans, client processes, and the sessions closed
        so far (reaped, or evicted while empty)."""
        with self.lock:
            sessions = self._sessions.values()
            return dict(sessions=len(self._sessions), reaped=self.reaped, evicted=self.evicted,
                        clients=len(self._clients),
                        requests=sum(len(x.requests) for x in sessions),
                        plans=sum(len(x.plans) for x in sessions))

    def reaped_error(self) -> ValueError:
        return ValueError(f"this client's session was reaped (no ping for "
                          f"{self.worker_timeout_s} s): register again")
