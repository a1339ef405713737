"""Client sessions of a ``gpukv serve`` process, and what each request does to the books.

Identities. A session is a client's random secret (never echoed back, never in a message). Its
instances are namespaced by the session; its requests by its *group* (a second secret that the
processes of one engine share, default: the session itself), so a scheduler's lookup and its
workers' retrieves meet, and no other session can retrieve with, release or learn about them.
Error messages show only the caller's own ids (:class:`Scoped` prints just the id).

Plans. STORE_BEGIN and RETRIEVE_BEGIN hand the worker arena slots and keep the plan (its write
reservation, or its pins) in the session until STORE_COMMIT / RETRIEVE_END. A session silent for
the worker timeout is reaped: its requests end, its instances are unregistered; its open plans are
*orphaned*, not released (:mod:`gpukv.frontend.orphans`): the slots stay out of circulation until
the worker's process is gone, because a stalled worker that wakes up would otherwise copy into
slots handed to someone else. Plan ids are unique server-wide, so a late call of a reaped client
never names a plan of its new session. A reap may land in the middle of a request: the handler
then finds its session closed and undoes what it did.

Bounds per session (:class:`Limits`): instances, open requests, plans in flight and bytes
reserved for stores; past one, a request gets a ``Busy`` error reply and changes nothing (a
single store larger than the reserved-bytes bound is not refused: it stores what fits, as in a
full arena).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
from typing import Any, Hashable

from gpukv.engine.core import CacheCore, RetrievePlan, StorePlan, UnknownRequest
from gpukv.engine.chunks import token_range
from gpukv.errors import Busy
from gpukv.frontend import protocol as p
from gpukv.frontend.orphans import Orphans, release
from gpukv.frontend.session import Limits, Scoped, Session

log = logging.getLogger(__name__)


class Sessions:
    """Client sessions and the core calls of every request type (thread-safe)."""

    def __init__(self, core: CacheCore, *, worker_timeout_s: float = 30.0,
                 limits: Limits | None = None) -> None:
        self.core = core
        self.worker_timeout_s = worker_timeout_s
        self.limits = limits or Limits()
        if self.limits.max_reserved_bytes is None:
            self.limits.max_reserved_bytes = core.config.capacity_bytes // 2
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        self.orphans = Orphans()
        self._plan_ids = itertools.count(1)  # server-wide: a reaped client's ids never recur
        self.reaped = 0
        self._handlers = {
            p.Ping: self._ping, p.Register: self._register, p.Unregister: self._unregister,
            p.StoreBegin: self._store_begin, p.StoreCommit: self._store_commit,
            p.Lookup: self._lookup, p.RetrieveBegin: self._retrieve_begin,
            p.RetrieveEnd: self._retrieve_end, p.FreeLookupLocks: self._free,
            p.EndSession: self._end, p.Stats: self._stats, p.Flush: self._flush}

    def touch(self, sid: str, group: str | None) -> None:
        """Mark ``sid`` alive now (a new id starts a new, empty session). ValueError if the
        session named another group before (nothing changes)."""
        with self._lock:
            entry = self._sessions.get(sid)
            if entry is None:
                self._sessions[sid] = Session(sid, group or sid, time.monotonic())
            elif entry.group != (group or sid):
                raise ValueError("this session belongs to another group: use a new client")
            else:
                entry.last_seen = time.monotonic()

    def handle(self, sid: str, body) -> Any:
        """Run one decoded request body for session ``sid``; its return value is the reply."""
        return self._handlers[type(body)](self._session(sid), body)

    # ---- handlers ----------------------------------------------------------------------------
    def _ping(self, s: Session, body: p.Ping) -> dict:
        if body.pid is not None:
            s.pid = body.pid
        cfg = self.core.config
        return dict(version=p.PROTOCOL_VERSION, chunk_size=cfg.chunk_size, salt=cfg.salt,
                    devices=list(cfg.devices), arenas=self.core.arena_names,
                    worker_timeout_s=self.worker_timeout_s,
                    pid=os.getpid(), max_hashes=min(p.MAX_HASHES, cfg.max_keys_per_request))

    def _register(self, s: Session, body: p.Register) -> dict:
        with self._lock:
            if body.instance_id in s.instances:
                raise ValueError(f"instance {body.instance_id!r} is already registered")
            if len(s.instances) >= self.limits.max_instances:
                raise Busy(f"busy: this client registered {len(s.instances)} instances, at most "
                           f"{self.limits.max_instances} (gpukv serve --max-instances)")
            key = s.instances[body.instance_id] = Scoped(s.sid, body.instance_id)
        try:
            device = self.core.arena_for(body.device)
            layout = {f: getattr(body.layout, f) for f in body.layout.__struct_fields__}
            inst = self.core.register(key, body.model, layout, kind=body.layout.kind,
                                      tp_rank=body.tp_rank, tp_size=body.tp_size, device=device,
                                      shared=body.shared)
        except BaseException:
            with self._lock:
                s.instances.pop(body.instance_id, None)
            raise
        if s.closed:  # reaped meanwhile (the reaper may not have seen it registered yet)
            with contextlib.suppress(ValueError):
                self.core.unregister(key)
            raise self._reaped_error()
        return dict(device=device, arenas=[m.handle for m in self.core.memories],
                    chunk_bytes=inst.chunk_bytes, kv_rank=inst.space.kv_rank)

    def _unregister(self, s: Session, body: p.Unregister) -> None:
        key = self._instance(s, body.instance_id)
        self.core.unregister(key)
        with self._lock:
            s.instances.pop(body.instance_id, None)

    def _store_begin(self, s: Session, body: p.StoreBegin) -> dict:
        key = self._instance(s, body.instance_id)
        self._check_plans(s)
        inst, bound = self.core.registry.instance(key), self.limits.max_reserved_bytes
        with self._lock:
            room = max(0, (bound - s.reserved_bytes) // inst.chunk_bytes)
            in_flight = s.reserved_bytes
        # reserve (and evict for) at most ``room`` chunks of those not held yet: a store larger
        # than the bound alone stores what fits (like a full arena); one that finds the bound
        # taken by this client's other stores in flight is Busy and changes nothing
        absent = [i for i, k in enumerate(inst.space.keys(body.hashes)) if k not in self.core.l1]
        if absent and not room:
            raise Busy(f"busy: this client has {in_flight} bytes of stores in flight (at most "
                       f"{bound}, gpukv serve --max-reserved); commit them first")
        take = absent[:room]
        plan = self.core.begin_store(key, [body.hashes[i] for i in take])
        plan.chunks = [take[i] for i in plan.chunks]
        plan.cached += len(body.hashes) - len(absent)
        plan.full += len(absent) - len(take)
        plan_id, over = 0, []
        with self._lock:  # other stores of this client may have reserved meanwhile
            keep = min(len(plan.handles), max(0, (bound - s.reserved_bytes) // inst.chunk_bytes))
            over, plan.handles, plan.chunks = plan.handles[keep:], plan.handles[:keep], plan.chunks[:keep]
            plan.full += len(over)
            if plan.handles:
                plan_id = self._add_plan(s, plan)
                s.reserved_bytes += keep * inst.chunk_bytes if plan_id else 0
        if plan.handles and not plan_id:  # reaped meanwhile
            over += plan.handles
        if over:
            self.core.l1.abort_write(over)
        if plan.handles and not plan_id:
            raise self._reaped_error()
        return dict(plan=plan_id, chunks=plan.chunks, offsets=[h.offset for h in plan.handles],
                    devices=[h.device for h in plan.handles], cached=plan.cached, full=plan.full)

    def _store_commit(self, s: Session, body: p.StoreCommit) -> int:
        plan = self._take_plan(s, body.plan, StorePlan)
        with self._lock:
            s.reserved_bytes -= len(plan.handles) * plan.instance.chunk_bytes
        if not body.ok:
            self.core.abort_store(plan)
            return 0
        return self.core.commit_store(plan)

    def _lookup(self, s: Session, body: p.Lookup) -> int:
        if body.loadable and not self._group_can_load(s.group, body.model, body.tp_size):
            return 0  # e.g. its workers have not registered (again, after a restart) yet
        owner = Scoped(s.group, body.request_id)
        with self._lock:
            new = owner not in s.requests
            if new and len(s.requests) >= self.limits.max_open_requests:
                raise Busy(f"busy: this client has {len(s.requests)} open requests, at most "
                           f"{self.limits.max_open_requests} (gpukv serve --max-open-requests); "
                           "end some")
        hits = self.core.lookup(body.model, body.hashes, request=owner, tp_size=body.tp_size,
                                num_readers=body.num_readers, creator=s.sid)
        with self._lock:
            if not s.closed:
                s.requests.add(owner)
        if s.closed:  # reaped meanwhile: its requests end
            self.core.end_request(owner)
            raise self._reaped_error()
        return hits * self.core.config.chunk_size

    def _retrieve_begin(self, s: Session, body: p.RetrieveBegin) -> dict:
        key = self._instance(s, body.instance_id)
        self._check_plans(s)
        owner = Scoped(s.group, body.request_id)
        try:
            plan = self.core.begin_retrieve(key, body.hashes, request=owner)
        except UnknownRequest:
            raise ValueError(f"unknown request {body.request_id!r}: LOOKUP it first") from None
        if plan is None:
            return dict(plan=0, devices=[], offsets=[])
        with self._lock:
            plan_id = self._add_plan(s, plan)
        if not plan_id:  # reaped meanwhile
            self.core.l1.unpin(plan.handles)
            raise self._reaped_error()
        return dict(plan=plan_id, devices=[h.device for h in plan.handles],
                    offsets=[h.offset for h in plan.handles])

    def _retrieve_end(self, s: Session, body: p.RetrieveEnd) -> int:
        return self.core.end_retrieve(self._take_plan(s, body.plan, RetrievePlan))

    def _free(self, s: Session, body: p.FreeLookupLocks) -> int:
        start, end = token_range(body.start_token, body.end_token, self.core.config.chunk_size)
        return self.core.free(Scoped(s.group, body.request_id), start_chunk=start, end_chunk=end)

    def _end(self, s: Session, body: p.EndSession) -> None:
        owner = Scoped(s.group, body.request_id)
        req = self.core.requests.get(owner)
        self.core.end_request(owner)
        with self._lock:
            creator = self._sessions.get(req.creator) if req is not None else None
            for entry in (s, creator):
                if entry is not None:
                    entry.requests.discard(owner)

    def _stats(self, s: Session, body: p.Stats) -> dict:
        out = self.core.stats()
        with self._lock:
            out["server"] = dict(sessions=len(self._sessions), reaped=self.reaped,
                                 orphaned_plans=len(self.orphans),
                                 requests=sum(len(x.requests) for x in self._sessions.values()),
                                 plans=sum(len(x.plans) for x in self._sessions.values()))
        if body.query is not None:
            q = body.query
            out["query"] = self.core.object_states(q.model, q.hashes, kv_rank=q.kv_rank)
        return out

    def _flush(self, s: Session, body: p.Flush) -> bool:
        return self.core.flush(body.timeout_s)

    # ---- reaping -----------------------------------------------------------------------------
    @property
    def num_sessions(self) -> int:
        """Client sessions alive now (the ``gpukv_connected_clients`` gauge)."""
        return len(self._sessions)

    def reap_idle(self, cutoff: float) -> list[str]:
        """Reap every session last seen before ``cutoff``; returns their ids. Also releases
        orphaned plans whose worker is gone, and forgets requests whose lease passed."""
        with self._lock:
            idle = [sid for sid, s in self._sessions.items() if s.last_seen < cutoff]
        for sid in idle:
            self.reap(sid)
        if idle and self.core.observer.metrics is not None:
            self.core.observer.metrics.client_reaped(len(idle))
        self._release_orphans()
        self._prune_requests()
        return idle

    def reap(self, sid: str) -> int:
        """End a session: its requests end, its instances are unregistered, its plans are
        orphaned (see the module docstring). Returns the shares released."""
        with self._lock:  # one step: a handler still running sees it closed, adds nothing
            s = self._sessions.pop(sid, None)
            if s is None:
                return 0
            self.reaped += 1
            s.closed = True
            requests, instances = list(s.requests), list(s.instances.values())
            plans, s.plans = s.plans, {}
            self.orphans.add(sid, s.pid, 0.0 if s.pid is not None else self.worker_timeout_s, plans)
        released = sum(self.core.end_request(owner) for owner in requests)
        for key in instances:
            with contextlib.suppress(ValueError):  # a register in flight undoes itself
                self.core.unregister(key)
        log.info("reaped a client: %d shares of %d requests released, %d instances dropped, "
                 "%d plans orphaned", released, len(requests), len(instances), len(plans))
        self._release_orphans()
        return released

    def close(self) -> None:
        with self._lock:
            sids = list(self._sessions)
        for sid in sids:
            self.reap(sid)
        release(self.core, self.orphans.take_all())

    def _release_orphans(self) -> None:
        release(self.core, self.orphans.due())

    def _prune_requests(self) -> None:
        with self._lock:
            for s in self._sessions.values():
                s.requests = {owner for owner in s.requests if owner in self.core.requests}

    # ---- helpers -----------------------------------------------------------------------------
    def _session(self, sid: str) -> Session:
        with self._lock:
            entry = self._sessions.get(sid)
        if entry is None:
            raise self._reaped_error()
        return entry

    def _reaped_error(self) -> ValueError:
        return ValueError(f"this client's session was reaped (no ping for "
                          f"{self.worker_timeout_s} s): register again")

    def _instance(self, s: Session, instance_id: Hashable) -> Scoped:
        with self._lock:
            key = s.instances.get(instance_id)
        if key is None:
            raise ValueError(f"unknown instance {instance_id!r} for this client: REGISTER it first")
        return key

    def _group_can_load(self, group: str, model: str, tp_size: int) -> bool:
        """Whether sessions of ``group`` registered instances of ``model`` for every TP rank
        ``0..tp_size-1`` (a LOOKUP with ``loadable``)."""
        with self._lock:
            keys = [key for x in self._sessions.values() if x.group == group for key in x.instances.values()]
        ranks = set()
        for key in keys:
            with contextlib.suppress(ValueError):  # unregistered meanwhile
                inst = self.core.registry.instance(key)
                if inst.model == model and inst.tp_size == tp_size:
                    ranks.add(inst.tp_rank)
        return len(ranks) == tp_size

    def _check_plans(self, s: Session) -> None:
        if len(s.plans) >= self.limits.max_plans:
            raise Busy(f"busy: this client has {len(s.plans)} stores/retrieves in flight, at most "
                       f"{self.limits.max_plans} (gpukv serve --max-plans)")

    def _add_plan(self, s: Session, plan) -> int:
        """Keep ``plan`` in the session (lock held); 0 when the session was reaped."""
        if s.closed:
            return 0
        plan_id = next(self._plan_ids)
        s.plans[plan_id] = plan
        return plan_id

    def _take_plan(self, s: Session, plan_id: int, kind: type):
        """The session's open plan ``plan_id``. A plan orphaned when this client's session was
        reaped is released now (its copy is over: the client sends a commit or end only then)
        and the call fails, so a late commit never makes anything readable."""
        with self._lock:
            if isinstance(s.plans.get(plan_id), kind):
                return s.plans.pop(plan_id)
        late = self.orphans.take(s.sid, plan_id, kind)
        if late is None:
            raise ValueError(f"no {kind.__name__} {plan_id} open for this client")
        release(self.core, [late])
        raise ValueError(f"{kind.__name__} {plan_id} was dropped: this client's session was reaped "
                         f"(no ping for {self.worker_timeout_s} s); nothing was committed")
