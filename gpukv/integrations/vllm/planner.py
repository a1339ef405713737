"""Scheduler-side planning of the vLLM connector: lookups, shares, and each step's loads and stores.

Runs in vLLM's EngineCore process on plain values (:mod:`.plan`). The rules, and the vLLM 0.32
behaviour behind them (``vllm/v1/core/sched/scheduler.py``):

- vLLM calls ``get_num_new_matched_tokens`` at every step while a request waits for blocks, and
  may call it again after a preemption. The first call looks up every pipeline stage's model
  (the server takes the shares: MLA ``tp_size`` per object, MHA one per rank shard) and the hit
  is the shortest stage's; later calls reuse that answer and only look up again after
  ``relookup_s`` (an idempotent top-up). The answer is capped at ``num_tokens - 1`` (vLLM must
  compute at least one token). Lookups ask the server to count only chunks the engine's own
  registered workers can load (``loadable``): after a server restart, until the workers have
  registered again, the engine gets no hit it could not load.
- The scheduler never waits for the server longer than its step budget (:mod:`.calls`): a lookup
  not answered in time makes the request wait (vLLM's "ask again later", ``None``) and is
  collected at a later step; after ``lookup_wait_s`` without an answer the request goes on
  without gpukv (a miss). Frees and ends run in order after the lookups sent before them and are
  waited for within the same budget (a healthy server has run them when the hook returns).
- ``after_alloc`` is the commit: vLLM's own hit is ``[0, local)`` (whole blocks); if it takes no
  external tokens every share is freed, else the shares of chunks inside ``[0, local)`` are freed
  and the load of chunks ``[0, hit)`` is planned, block ``-1`` for the blocks vLLM already holds.
  A chunk is a whole number of blocks, so a load writes whole blocks only.
- **O(new) plans.** Each request's chunks are hashed once, on this side (:mod:`.chain`), when its
  lookup or a store first needs them. ``build`` plans each pending load (the hashes of chunks
  ``[0, hit)`` and their blocks) and, per scheduled request, the store of the chunks that are
  fully computed after this step and were never planned before: their hashes and blocks only.
  Loaded chunks are not stored again. Only tokens in ``token_ids`` count (prompt and accepted
  outputs, never speculative drafts). A step's plan and the work of building it grow with the
  step's new chunks, never with a prompt's length.
- **Asynchronous loads** (``async_loads``): the request waits in vLLM while the workers load it
  after the forward; vLLM does not schedule it that step, so its load's blocks come from
  ``after_alloc``. **Asynchronous stores** (``async_stores``): a preempted request is named in
  the next plan's ``preempted`` (its workers wait for its stores before the forward that may
  overwrite its blocks).
- A request that comes back to the lookup after it was admitted was preempted: its plan starts
  again (vLLM freed its blocks; its tokens now include its outputs).
- A prompt shorter than one chunk is not looked up (the server could hold nothing for it).
- **The end of a request** (:mod:`.ends`): ``finished`` ends it on the server at once, or fences
  it while a copy may still use its blocks (an asynchronous store, a load that may not have run:
  vLLM keeps the blocks until every worker reports it), or, during an asynchronous load (the
  request waits in vLLM for it: ``async_loads``), ends it once every worker reported the load.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

from gpukv.integrations.vllm.request_books import RequestBooks
from gpukv.integrations.vllm.calls import ServerCalls
from gpukv.integrations.vllm.chain import ChunkChain
from gpukv.integrations.vllm.ends import RequestEnds
from gpukv.integrations.vllm.group_lookup import lookup_parts
from gpukv.integrations.vllm.kv_groups import ONE_GROUP, KVGroup, Parts
from gpukv.integrations.vllm.plan import RequestInfo, StepPlan, StepView, group_lists


class SchedulerPlanner:
    """The scheduler side's books. ``client`` has the ``CacheClient`` API (lookup_hashes,
    free_lookup_locks, end_session); ``models``: one model key per pipeline stage (a str for
    one stage); ``groups``: the engine's KV cache groups (:mod:`.kv_groups`: every stage's
    groups are looked up, a chunk counts where every part holds it); ``salt``: the server's (the chains start from it; default: the client's
    ``server_info``); ``calls``: where the server calls run (default: inline, no budget)."""

    def __init__(self, client: Any, models: str | Sequence[str], *, tp_size: int, chunk_size: int,
                 groups: Sequence[KVGroup] = ONE_GROUP,
                 block_size: int, salt: str | None = None, load: bool = True, store: bool = True,
                 relookup_s: float = 5.0, lookup_wait_s: float = 1.0, max_in_flight: int = 1,
                 loadable: bool = False, async_loads: bool = False, async_stores: bool = False,
                 calls: ServerCalls | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        for name, value in (("tp_size", tp_size), ("chunk_size", chunk_size), ("block_size", block_size),
                            ("max_in_flight", max_in_flight)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if chunk_size % block_size:
            raise ValueError(f"chunk_size {chunk_size} must be a multiple of block_size {block_size}")
        self.models = (models,) if isinstance(models, str) else tuple(models)
        if not self.models:
            raise ValueError("models must name at least one pipeline stage's model key")
        self.parts = Parts.of(self.models, groups)
        self.groups = self.parts.groups
        self._keys = self.parts.keys  # one per (stage, group): what a lookup asks
        self._part_groups = [self.groups[g] for _, g in self.parts.all]
        self.client, self.tp_size = client, tp_size
        self.salt = client.server_info.get("salt", "") if salt is None else salt
        self.chunk_size, self.block_size = chunk_size, block_size
        self.load, self.store, self.relookup_s, self._clock = load, store, relookup_s, clock
        self.lookup_wait_s, self.max_in_flight, self.loadable = lookup_wait_s, max_in_flight, loadable
        self.async_loads, self.async_stores = async_loads, async_stores
        self.calls = calls if calls is not None else ServerCalls(0.0, inline=True)
        self._requests: dict[str, RequestBooks] = {}
        self._to_load: dict[str, RequestBooks] = {}  # loads committed, not in a plan yet
        self._ends: RequestEnds[RequestBooks] = RequestEnds()  # finished, not ended yet
        self._step = 0
        self._step_open = False  # this step's budget started (its first lookup, or its plan)
        self.num_lookups = 0  # lookups sent (one per stage each)
        self.num_given_up = 0  # requests that went on without an answer

    @property
    def model(self) -> str:
        return self.models[0]

    @property
    def num_tracked(self) -> int:
        return len(self._requests)

    def hit_of(self, request_id: str) -> int | None:
        """The tokens gpukv holds for a tracked request (shares taken), None if not known yet."""
        req = self._requests.get(request_id)
        return None if req is None else req.hit

    def chain_of(self, request_id: str) -> ChunkChain | None:
        req = self._requests.get(request_id)
        return None if req is None else req.chain

    def _rids(self, request_id: str) -> list[str]:
        return self.parts.request_ids(request_id)

    # ---- lookups -----------------------------------------------------------------------------
    def num_new_matched_tokens(self, info: RequestInfo, num_computed_tokens: int) -> int | None:
        """Tokens vLLM can load beyond its own ``num_computed_tokens`` (a multiple of its block
        size); 0 when gpukv has nothing more; None when the answer is not there yet (ask again).
        Repeated calls for one request are idempotent."""
        if not isinstance(num_computed_tokens, int) or num_computed_tokens < 0:
            raise ValueError(f"num_computed_tokens must be a non-negative int, got {num_computed_tokens!r}")
        req = self._requests.get(info.request_id)
        if req is None or req.admitted:  # new, or back after a preemption: plan it afresh
            req = self._requests[info.request_id] = self._new_request(info, req)
        req.local = num_computed_tokens
        self._open_step()
        if not (self.load and info.lookup):
            return 0
        if len(info.token_ids) < self.chunk_size:  # no full chunk: nothing to ask the server
            req.hit = 0
        else:
            now = self._clock()
            if req.pending is None and (req.hit is None or now - req.looked_up_at >= self.relookup_s):
                self._send_lookups(req, now)
            if req.pending is not None:
                answers = self.calls.wait(req.pending)
                if answers is not None:
                    self._take(req, answers)
                elif req.hit is None:  # no answer yet (a relookup keeps the previous one)
                    if now - req.first_asked < self.lookup_wait_s:
                        return None
                    req.pending, req.hit = None, 0  # go on without gpukv; its end frees late shares
                    self.num_given_up += 1
        usable = min(req.hit, len(info.token_ids) - 1)
        return max(0, usable - num_computed_tokens)

    def _new_request(self, info: RequestInfo, old: RequestBooks | None) -> RequestBooks:
        """A request's books; after a preemption its chain, stores and server request carry over."""
        if old is not None:
            return RequestBooks(info, old.chain, stored_upto=old.stored_upto, opened=old.opened,
                                block_ids=[[] for _ in self.groups])
        return RequestBooks(info, ChunkChain(self.chunk_size, salt=self.salt, seed=info.seed,
                                             mm_items=info.mm_items), block_ids=[[] for _ in self.groups])

    def _open_step(self) -> None:
        """One budget per engine step (vLLM's schedule, forward, then its outputs): it starts at
        the step's first lookup, or at its plan when nothing was looked up, and covers the ends
        of requests that finish after the forward; the next step's first lookup starts the
        next one."""
        if not self._step_open:
            self.calls.new_step()
            self._step_open = True

    def _send_lookups(self, req: RequestBooks, now: float) -> None:
        info = req.info
        num_chunks = len(info.token_ids) // self.chunk_size
        hashes = req.chain.extend(info.token_ids, num_chunks)[:num_chunks]  # a snapshot
        options = dict(loadable=True) if self.loadable else {}
        # one call on the calls thread: a sliding window's rounds depend on the others' answers
        req.pending = [self.calls.submit(lookup_parts, self.client, self._keys, self._rids(info.request_id),
                                         self._part_groups, hashes, self.chunk_size, tp_size=self.tp_size,
                                         **options)]
        if req.hit is None:
            req.first_asked = now
        req.looked_up_at, req.opened = now, True
        self.num_lookups += len(self._keys)

    def _take(self, req: RequestBooks, answers: list[int]) -> None:
        """The parts' answers: the hit is the shortest; a longer prefix part's extra shares go (a
        sliding-window part's stay until the request ends: :mod:`.group_lookup`)."""
        req.pending = None
        answers = answers[0]  # the one call's answer per part
        req.hit = hit = min(int(a) for a in answers)
        for rid, answer, group in zip(self._rids(req.info.request_id), answers, self._part_groups):
            if answer > hit and not group.sliding:
                self.calls.send(self.client.free_lookup_locks, rid, start_token=hit)

    def _free(self, request_id: str, **token_range: int) -> None:
        self.calls.settle([self.calls.send(self.client.free_lookup_locks, rid, **token_range)
                           for rid, group in zip(self._rids(request_id), self._part_groups)
                           if not (token_range and group.sliding)])

    # ---- allocation and steps ----------------------------------------------------------------
    def after_alloc(self, request_id: str, num_external_tokens: int,
                    block_ids: Sequence | None = None) -> None:
        """vLLM allocated the request's blocks (``block_ids``: its whole block table, if known;
        one list per KV cache group, or a flat list for one group) and counts
        ``num_external_tokens`` as loaded."""
        req = self._requests.get(request_id)
        if req is None:
            raise ValueError(f"after_alloc for request {request_id!r}, which was never looked up")
        if block_ids is not None:
            req.block_ids = group_lists(block_ids, len(self.groups))
        if req.admitted and req.load_step is not None and num_external_tokens == 0:
            return  # admitted again once its asynchronous load is in: nothing new to plan
        req.admitted = True
        if not req.hit:
            return
        if num_external_tokens <= 0:
            self._free(request_id)  # vLLM takes nothing from gpukv
            req.hit = 0
            return
        end = req.local + num_external_tokens
        if end > req.hit:
            raise ValueError(f"request {request_id!r}: vLLM counts {end} tokens loaded, gpukv offered {req.hit}")
        if req.local % self.block_size:
            raise ValueError(f"request {request_id!r}: vLLM's own hit {req.local} is not whole blocks "
                             f"of {self.block_size}")
        held = req.local - req.local % self.chunk_size
        if held:  # chunks vLLM already holds in full
            self._free(request_id, start_token=0, end_token=held)
        req.pending_load = (req.local, end)
        self._to_load[request_id] = req

    def build(self, view: StepView) -> StepPlan:
        """This step's plan; call once per engine step, after the step's ``after_alloc`` calls."""
        self._step += 1
        self._open_step()
        self._step_open = False  # the ends after this step's forward still spend its budget
        plan = StepPlan(self._step, preempted=sorted(view.preempted))
        for request_id in view.preempted:
            req = self._requests.get(request_id)
            if req is not None:  # vLLM freed its blocks; its workers wait for its stores first
                req.block_ids, req.store_step = [[] for _ in self.groups], None
        scheduled = []
        for sched in view.requests:
            req = self._requests.get(sched.request_id)
            if req is None:
                continue  # never looked up (should not happen): nothing to plan
            if sched.replace_blocks:
                req.block_ids = group_lists(sched.block_ids or [()] * len(self.groups), len(self.groups))
            elif sched.block_ids:
                for ids, new in zip(req.block_ids, group_lists(sched.block_ids, len(self.groups))):
                    ids.extend(new)
            scheduled.append((req, sched.num_computed_tokens, sched.num_scheduled_tokens))
        for req in self._to_load.values():
            plan.loads.append(req.load_spec(self.chunk_size, self.block_size, self.groups))
            req.pending_load, req.load_step, req.loading = None, self._step, self.async_loads
        self._to_load.clear()
        for req, computed, scheduled_now in scheduled:
            spec = req.store_spec(computed + scheduled_now, self.chunk_size, self.block_size, self.groups,
                                  scheduled_from=computed) if (self.store and req.info.store) else None
            if spec is not None:
                plan.stores.append(spec)
                req.store_step = self._step
        for request_id in view.finished:
            self._requests.pop(request_id, None)
        plan.released = self._ends.take_released()
        return plan

    # ---- the end of a request (see :mod:`.ends`) -----------------------------------------------
    def finished(self, request_id: str) -> bool:
        """The request is done (finished, aborted or rejected). Returns whether vLLM must keep its
        blocks until the workers report it (a copy may still use them: the fence)."""
        req = self._requests.pop(request_id, None)
        self._to_load.pop(request_id, None)  # a load never put in a plan is dropped with it
        if req is None:
            return False
        if req.loading:  # vLLM keeps the blocks until the load is reported; then it ends
            self._ends.after_load(request_id, req)
            return False
        recent_load = req.load_step is not None and req.load_step > self._step - self.max_in_flight
        if recent_load or (self.async_stores and req.store_step is not None):
            self._ends.fence(request_id, req)
            return True
        self._end(req)
        return False

    def workers_done(self, request_ids: Sequence[str]) -> None:
        """Every worker reported these fenced requests finished (vLLM's aggregated
        ``finished_sending``): their copies are done with the blocks; end them on the server."""
        for req in self._ends.workers_done(request_ids):
            self._end(req)

    def loads_done(self, request_ids: Sequence[str]) -> None:
        """Every worker reported these requests' asynchronous loads done (vLLM's aggregated
        ``finished_recving``)."""
        for request_id in request_ids:
            req = self._requests.get(request_id)
            if req is not None:
                req.loading = False
        for req in self._ends.loads_done(request_ids):
            self._end(req)

    @property
    def num_fenced(self) -> int:
        return len(self._ends)

    def _end(self, req: RequestBooks) -> None:
        if req.opened:
            self.calls.settle([self.calls.send(self.client.end_session, rid)
                               for rid in self._rids(req.info.request_id)])

    def close(self) -> None:
        """End every request still open (engine shutdown), then stop the calls' thread."""
        for req in [*self._requests.values(), *self._ends.drain()]:
            self._end(req)
        self._requests.clear()
        self.calls.close()
