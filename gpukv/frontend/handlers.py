"""What each request does to the books: one handler per request type of the v2 protocol.

A handler gets the caller's open :class:`Session` and the decoded body, calls the core, and
returns the reply's value (or raises: ValueError / TypeError for bad input, :class:`Busy` past a
bound, both changing nothing). A reap may land in the middle of a request: the handler then finds
its session closed and undoes what it did. Bounds (:class:`Limits`): per session instances, open
requests and plans in flight; per client process the bytes reserved for stores (a single store
larger than that bound is not refused: it stores what fits, as in a full arena); a full
server-wide request table makes room for a session below its fair share
(:mod:`gpukv.frontend.fair_share`).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from gpukv.engine.chunks import token_range
from gpukv.engine.core import CacheCore
from gpukv.engine.grants import ReadGrant, UnknownRequest, WriteGrant
from gpukv.engine.hit_sources import LookupHit
from gpukv.errors import Busy
from gpukv.frontend import protocol as p
from gpukv.frontend.fair_share import RequestShares
from gpukv.frontend.holes import HoleCheck
from gpukv.frontend.plans import PlanBook
from gpukv.frontend.session import Limits, Scoped, Session
from gpukv.frontend.session_table import SessionTable


class Handlers:
    """The request handlers of one server (thread-safe: state lives in the table and books)."""

    def __init__(self, core: CacheCore, table: SessionTable, plans: PlanBook,
                 limits: Limits, *, check_holes: bool = True) -> None:
        self.core, self.table, self.plans, self.limits = core, table, plans, limits
        self.shares = RequestShares(core, table)
        self.holes = HoleCheck(core.memories, check_holes)
        self.by_type = {
            p.Ping: self.ping, p.Register: self.register, p.Unregister: self.unregister,
            p.StoreBegin: self.store_begin, p.StoreCommit: self.store_commit,
            p.Lookup: self.lookup, p.RetrieveBegin: self.retrieve_begin,
            p.RetrieveEnd: self.retrieve_end, p.FreeLookupLocks: self.free,
            p.EndSession: self.end, p.Stats: self.stats, p.Flush: self.flush,
            p.VllmBlocks: self.vllm_blocks}

    def __call__(self, s: Session, body) -> Any:
        return self.by_type[type(body)](s, body)

    # ---- identity and registration ---------------------------------------------------------
    def ping(self, s: Session, body: p.Ping) -> dict:
        # body.pid is not used: the server observes its peers' processes itself (liveness.py)
        cfg = self.core.config
        return dict(version=p.PROTOCOL_VERSION, chunk_size=cfg.chunk_size, salt=cfg.salt,
                    devices=list(cfg.devices), arenas=self.core.placement.names,
                    worker_timeout_s=self.table.worker_timeout_s,
                    pid=os.getpid(), max_hashes=min(p.MAX_HASHES, cfg.max_keys_per_request),
                    features=["lookup_tiers", *(["vllm_blocks"] if self.core.router else [])])

    def register(self, s: Session, body: p.Register) -> dict:
        with self.table.lock:
            if body.instance_id in s.instances:
                raise ValueError(f"instance {body.instance_id!r} is already registered")
            if len(s.instances) >= self.limits.max_instances:
                raise Busy(f"busy: this client registered {len(s.instances)} instances, at most "
                           f"{self.limits.max_instances} (gpukv serve --max-instances)")
            key = s.instances[body.instance_id] = Scoped(s.sid, body.instance_id)
        try:
            device = self.core.placement.arena_for(body.device)
            layout = {f: getattr(body.layout, f) for f in body.layout.__struct_fields__}
            inst = self.core.register(key, body.model, layout, kind=body.layout.kind,
                                      tp_rank=body.tp_rank, tp_size=body.tp_size, device=device,
                                      shared=body.shared)
        except BaseException:
            with self.table.lock:
                s.instances.pop(body.instance_id, None)
            raise
        if s.closed:  # reaped meanwhile (the reaper may not have seen it registered yet)
            with contextlib.suppress(ValueError):
                self.core.unregister(key)
            raise self.table.reaped_error()
        return dict(device=device, arenas=[m.handle for m in self.core.memories],
                    chunk_bytes=inst.chunk_bytes, kv_rank=inst.space.kv_rank)

    def unregister(self, s: Session, body: p.Unregister) -> None:
        key = self.table.instance(s, body.instance_id)
        self.core.unregister(key)
        with self.table.lock:
            s.instances.pop(body.instance_id, None)

    # ---- store -----------------------------------------------------------------------------
    def store_begin(self, s: Session, body: p.StoreBegin) -> dict:
        key = self.table.instance(s, body.instance_id)
        self.plans.check_room(s)
        inst, bound = self.core.registry.instance(key), self.limits.max_reserved_bytes
        client = s.client  # the bound is per client process: more sessions give no more room
        with self.table.lock:
            room = _room(bound, client.reserved_bytes, inst.chunk_bytes)
            in_flight = client.reserved_bytes
        # reserve (and evict for) at most ``room`` chunks of those not held yet: a store larger
        # than the bound alone stores what fits (like a full arena); one that finds the bound
        # taken by this client's other stores in flight is Busy and changes nothing
        absent = [i for i, k in enumerate(inst.space.keys(body.hashes)) if k not in self.core.l1]
        if absent and not room:
            raise Busy(f"busy: this client process has {in_flight} bytes of stores in flight or "
                       f"held (at most {bound}, gpukv serve --max-reserved); commit them first")
        take = absent[:room]
        plan = self.core.begin_store(key, [body.hashes[i] for i in take])
        plan.chunks = [take[i] for i in plan.chunks]
        plan.cached += len(body.hashes) - len(absent)
        plan.full += len(absent) - len(take)
        plan_id, over = 0, []
        with self.table.lock:  # other stores of this client may have reserved meanwhile
            keep = min(len(plan.handles), _room(bound, client.reserved_bytes, inst.chunk_bytes))
            over, plan.handles, plan.chunks = plan.handles[keep:], plan.handles[:keep], plan.chunks[:keep]
            plan.full += len(over)
            if plan.handles:
                plan_id = self.plans.add_locked(s, plan)
        if plan.handles and not plan_id:  # reaped meanwhile
            over += plan.handles
        if over:
            self.core.l1.abort_write(over)
        if plan.handles and not plan_id:
            raise self.table.reaped_error()
        return dict(plan=plan_id, chunks=plan.chunks, offsets=[h.offset for h in plan.handles],
                    devices=[h.device for h in plan.handles], cached=plan.cached, full=plan.full)

    def store_commit(self, s: Session, body: p.StoreCommit) -> int:
        plan = self.plans.take(s, body.plan, WriteGrant)
        if not body.ok:
            self.core.abort_store(plan)
            return 0
        damaged = self.holes.damaged(plan.handles)  # punched out before the commit: not stored
        if damaged:
            self.core.l1.abort_write(damaged)
            gone = {id(h) for h in damaged}
            plan.handles = [h for h in plan.handles if id(h) not in gone]
        return self.core.commit_store(plan)

    # ---- lookup and retrieve ---------------------------------------------------------------
    def lookup(self, s: Session, body: p.Lookup) -> int | dict:
        if body.loadable and not self._group_can_load(s.group, body.model, body.tp_size):
            # e.g. its workers have not registered (again, after a restart) yet
            return dict(tokens=0, sources=[]) if body.tiers else 0
        owner = Scoped(s.group, body.request_id)
        with self.table.lock:
            new = owner not in s.requests
            if new and len(s.requests) >= self.limits.max_open_requests:
                raise Busy(f"busy: this client has {len(s.requests)} open requests, at most "
                           f"{self.limits.max_open_requests} (gpukv serve --max-open-requests); "
                           "end some")
        try:
            hits = self._lookup(s, body, owner)
        except Busy:  # the server-wide table is full: a session below its fair share gets room
            if not new or not self.shares.make_room(s):
                raise
            hits = self._lookup(s, body, owner)
        with self.table.lock:
            if not s.closed:
                s.requests[owner] = None
        if s.closed:  # reaped meanwhile: its requests end
            self.core.end_request(owner)
            raise self.table.reaped_error()
        tokens = hits.chunks * self.core.config.chunk_size
        return dict(tokens=tokens, sources=hits.sources) if body.tiers else tokens

    def _group_can_load(self, group: str, model: str, tp_size: int) -> bool:
        """Whether sessions of ``group`` registered instances of ``model`` for every TP rank
        ``0..tp_size-1`` (a LOOKUP with ``loadable``)."""
        with self.table.lock:
            keys = [key for x in self.table.sessions_locked() if x.group == group
                    for key in x.instances.values()]
        ranks = set()
        for key in keys:
            with contextlib.suppress(ValueError):  # unregistered meanwhile
                inst = self.core.registry.instance(key)
                if inst.model == model and inst.tp_size == tp_size:
                    ranks.add(inst.tp_rank)
        return len(ranks) == tp_size

    def _lookup(self, s: Session, body: p.Lookup, owner: Scoped):
        lookup = self.core.lookup_tiers if body.tiers else self.core.lookup
        hits = lookup(body.model, body.hashes, request=owner, tp_size=body.tp_size,
                      num_readers=body.num_readers, creator=s.sid)
        return hits if body.tiers else LookupHit(hits, None)

    def retrieve_begin(self, s: Session, body: p.RetrieveBegin) -> dict:
        key = self.table.instance(s, body.instance_id)
        self.plans.check_room(s)
        owner = Scoped(s.group, body.request_id)
        try:
            plan = self.core.begin_retrieve(key, body.hashes, request=owner)
        except UnknownRequest:
            raise ValueError(f"unknown request {body.request_id!r}: LOOKUP it first") from None
        if plan is None:
            return dict(plan=0, devices=[], offsets=[])
        damaged = self.holes.damaged(plan.handles)  # before any worker reads (and hides) them
        if damaged:
            self.core.l1.delete([h.key for h in damaged], force=True)
            self.core.l1.unpin(plan.handles)
            self.core.observer.retrieve_failed("hole")
            return dict(plan=0, devices=[], offsets=[])
        with self.table.lock:
            plan_id = self.plans.add_locked(s, plan)
        if not plan_id:  # reaped meanwhile
            self.core.l1.unpin(plan.handles)
            raise self.table.reaped_error()
        return dict(plan=plan_id, devices=[h.device for h in plan.handles],
                    offsets=[h.offset for h in plan.handles])

    def retrieve_end(self, s: Session, body: p.RetrieveEnd) -> int:
        return self.core.end_retrieve(self.plans.take(s, body.plan, ReadGrant))

    # ---- request lifecycle -----------------------------------------------------------------
    def free(self, s: Session, body: p.FreeLookupLocks) -> int:
        start, end = token_range(body.start_token, body.end_token, self.core.config.chunk_size)
        return self.core.free(Scoped(s.group, body.request_id), start_chunk=start, end_chunk=end)

    def end(self, s: Session, body: p.EndSession) -> None:
        owner = Scoped(s.group, body.request_id)
        req = self.core.requests.get(owner)
        self.core.end_request(owner)
        self.table.forget_request(owner, s.sid, *((req.creator,) if req is not None else ()))

    # ---- vLLM blocks (router-grade events) ---------------------------------------------------
    def vllm_blocks(self, s: Session, body: p.VllmBlocks) -> dict:
        """Descriptions of an engine's chunks as vLLM blocks; with ``take_events`` the reply
        carries the events of the blocks the caller's group republishes (encoded in vLLM's
        format, oldest first; ``more``: others are waiting). ``epoch`` names the server process (a new one: the blocks an
        engine republished before are gone)."""
        router = self.core.router
        if router is None:
            raise ValueError("this server publishes no vLLM events: start gpukv serve with "
                             "--vllm-events ADDRESS")
        taken = router.describe(s.group, body)
        events, more = taken if taken is not None else (None, False)
        return dict(epoch=router.epoch, events=events, more=more)

    # ---- introspection ---------------------------------------------------------------------
    def stats(self, s: Session, body: p.Stats) -> dict:
        out = self.core.stats()
        server = self.table.totals()
        server["orphaned_plans"] = len(self.plans.orphans)
        server["preempted_requests"] = self.shares.preempted
        server["punched_chunks"] = self.holes.found
        out["server"] = server
        if body.query is not None:
            q = body.query
            out["query"] = self.core.object_states(q.model, q.hashes, kv_rank=q.kv_rank)
        return out

    def flush(self, s: Session, body: p.Flush) -> bool:
        return self.core.flush(body.timeout_s)


def _room(bound: int, reserved: int, chunk_bytes: int) -> int:
    """Chunks a client holding ``reserved`` bytes may still reserve under ``bound``; one at
    least when it holds none (a bound below one chunk must not forbid every store)."""
    return max(0 if reserved else 1, (bound - reserved) // chunk_bytes)
