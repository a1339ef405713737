"""Scheduler-side planning of the vLLM connector: lookups, shares, and each step's loads and stores.

Runs in vLLM's EngineCore process and sees only plain values (the connector translates vLLM's
``Request`` and ``SchedulerOutput``; nothing here imports vLLM). The workers see no requests: all
they load or store reaches them in the :class:`StepPlan` built here, one per engine step.

The rules (vLLM 0.32 behaviour behind them: /work/notes/vllm_facts.md):

- ``num_new_matched_tokens`` is called at every step while a request waits for blocks (149 times
  for one request in a measured run): the first call looks up (the server takes the shares: MLA
  ``tp_size`` per object, MHA one per rank shard), later calls reuse that answer and only look up
  again after ``relookup_s`` (an idempotent top-up, never added shares). The answer is capped at
  ``num_tokens - 1`` (vLLM must compute at least one token).
- ``after_alloc`` is the commit: vLLM's own hit is ``[0, local)``; if it takes no external tokens
  every share is freed, else the shares of chunks inside ``[0, local)`` are freed and the load of
  chunks ``[0, hit)`` is planned, with slot ``-1`` for the tokens vLLM already holds (its shared
  prefix blocks are never written). A chunk is a whole number of blocks, so a load writes whole
  blocks only.
- ``build`` plans, per scheduled request, the pending load and the store of every chunk that is
  fully computed after this step. Only tokens in ``token_ids`` count: it holds the prompt and
  the accepted outputs, never speculative draft tokens (scheduled, but not yet verified). Stores pass all tokens from 0 (the
  hash chain needs them); the server skips chunks it already holds.
- A request that comes back to the lookup after it was admitted was preempted: its plan starts
  again (vLLM freed its blocks; its tokens now include its outputs).
- A prompt shorter than one chunk is not looked up (the server could hold nothing for it), which
  saves it two round trips (the lookup and ending it).
- ``finished`` ends the request's session (whatever shares it still holds are released). Stores
  are synchronous (the worker returns from ``wait_for_save`` when they are done), so vLLM may free
  the blocks at once: ``finished`` returns False.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from gpukv.integrations.vllm.keys import MMItem, chunk_extras


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """A request as the planner needs it. ``token_ids``: prompt + outputs so far (vLLM's live
    ``all_token_ids`` view); ``seed``/``mm_items``: see :mod:`.keys`; ``cacheable``: False for
    prompt embeddings or ``skip_reading_prefix_cache`` (no lookup; stores still happen unless
    prompt embeddings)."""

    request_id: str
    token_ids: Sequence[int]
    seed: bytes = b""
    mm_items: tuple[MMItem, ...] = ()
    lookup: bool = True
    store: bool = True


@dataclass(frozen=True, slots=True)
class ScheduledRequest:
    """One request of a ``SchedulerOutput``. ``block_ids``: the whole block table for a new or
    resumed request (``replace_blocks``), else the blocks added this step (or None)."""

    request_id: str
    block_ids: Sequence[int] | None
    replace_blocks: bool
    num_computed_tokens: int
    num_scheduled_tokens: int


@dataclass(frozen=True, slots=True)
class StepView:
    requests: Sequence[ScheduledRequest]
    preempted: frozenset[str] = frozenset()
    finished: frozenset[str] = frozenset()


@dataclass(slots=True)
class LoadSpec:
    """Retrieve ``token_ids`` (int64, a whole number of chunks) into ``slot_mapping`` (int64, one
    slot per token, ``-1`` for tokens vLLM already holds). ``block_ids``: the blocks vLLM counts as
    loaded, reported if the load fails. Empty ``token_ids``: the load cannot be done (the
    request's blocks do not reach the end of the chunks to load); the workers report
    ``block_ids`` as failed."""

    request_id: str
    token_ids: np.ndarray
    slot_mapping: np.ndarray
    block_ids: list[int]
    seed: bytes
    extras: list[bytes] | None


@dataclass(slots=True)
class StoreSpec:
    """Store the full chunks of ``token_ids`` (int64, from token 0) from ``slot_mapping``."""

    request_id: str
    token_ids: np.ndarray
    slot_mapping: np.ndarray
    seed: bytes
    extras: list[bytes] | None


@dataclass(slots=True)
class StepPlan:
    """What the workers do in one engine step (carried in the connector metadata)."""

    step: int
    loads: list[LoadSpec] = field(default_factory=list)
    stores: list[StoreSpec] = field(default_factory=list)


@dataclass(slots=True)
class _Request:
    info: RequestInfo
    hit: int | None = None  # chunk-aligned tokens the server holds (shares taken), None: not looked up
    looked_up_at: float = 0.0
    local: int = 0  # vLLM's own hit at the last lookup call
    admitted: bool = False
    pending_load: tuple[int, int] | None = None  # (local, vLLM's loaded end)
    block_ids: list[int] = field(default_factory=list)
    stored_upto: int = 0
    opened: bool = False  # a lookup RPC was sent: the server holds a request to end


class SchedulerPlanner:
    """The scheduler side's books; ``client`` has the ``CacheClient`` API (lookup,
    free_lookup_locks, end_session)."""

    def __init__(self, client: Any, model: str, *, tp_size: int, chunk_size: int, block_size: int,
                 load: bool = True, store: bool = True, relookup_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        for name, value in (("tp_size", tp_size), ("chunk_size", chunk_size), ("block_size", block_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if chunk_size % block_size:
            raise ValueError(f"chunk_size {chunk_size} must be a multiple of block_size {block_size}")
        self.client, self.model, self.tp_size = client, model, tp_size
        self.chunk_size, self.block_size = chunk_size, block_size
        self.load, self.store, self.relookup_s, self._clock = load, store, relookup_s, clock
        self._requests: dict[str, _Request] = {}
        self._step = 0
        self.num_lookups = 0  # lookup RPCs sent

    @property
    def num_tracked(self) -> int:
        return len(self._requests)

    def hit_of(self, request_id: str) -> int | None:
        """The tokens gpukv holds for a tracked request (shares taken), None if not looked up."""
        req = self._requests.get(request_id)
        return None if req is None else req.hit

    def _extras(self, info: RequestInfo, num_tokens: int) -> list[bytes] | None:
        return chunk_extras(info.mm_items, num_tokens // self.chunk_size, self.chunk_size)

    def num_new_matched_tokens(self, info: RequestInfo, num_computed_tokens: int) -> int:
        """Tokens vLLM can load beyond its own ``num_computed_tokens`` (a multiple of its block
        size); 0 when gpukv has nothing more. Repeated calls for one request are idempotent."""
        if not isinstance(num_computed_tokens, int) or num_computed_tokens < 0:
            raise ValueError(f"num_computed_tokens must be a non-negative int, got {num_computed_tokens!r}")
        req = self._requests.get(info.request_id)
        if req is None or req.admitted:  # new, or back after a preemption: plan it afresh
            stored, opened = (req.stored_upto, req.opened) if req is not None else (0, False)
            req = self._requests[info.request_id] = _Request(info, stored_upto=stored, opened=opened)
        req.local = num_computed_tokens
        if not (self.load and info.lookup):
            return 0
        now = self._clock()
        if len(info.token_ids) < self.chunk_size:  # no full chunk: nothing to ask the server
            req.hit = 0
        elif req.hit is None or now - req.looked_up_at >= self.relookup_s:
            tokens = np.asarray(info.token_ids, dtype=np.int64)
            req.hit = int(self.client.lookup(self.model, tokens, request_id=info.request_id,
                                             tp_size=self.tp_size, seed=info.seed,
                                             extras=self._extras(info, len(tokens))))
            req.looked_up_at, req.opened = now, True
            self.num_lookups += 1
        usable = min(req.hit, len(info.token_ids) - 1)
        return max(0, usable - num_computed_tokens)

    def after_alloc(self, request_id: str, num_external_tokens: int) -> None:
        """vLLM allocated the request's blocks and counts ``num_external_tokens`` as loaded."""
        req = self._requests.get(request_id)
        if req is None:
            raise ValueError(f"after_alloc for request {request_id!r}, which was never looked up")
        req.admitted = True
        if not req.hit:
            return
        if num_external_tokens <= 0:
            self.client.free_lookup_locks(request_id)  # vLLM takes nothing from gpukv
            req.hit = 0
            return
        end = req.local + num_external_tokens
        if end > req.hit:
            raise ValueError(f"request {request_id!r}: vLLM counts {end} tokens loaded, gpukv offered {req.hit}")
        held = req.local - req.local % self.chunk_size
        if held:  # chunks vLLM already holds in full
            self.client.free_lookup_locks(request_id, start_token=0, end_token=held)
        req.pending_load = (req.local, end)

    def build(self, view: StepView) -> StepPlan:
        """This step's plan; call once per engine step, after the step's ``after_alloc`` calls."""
        self._step += 1
        plan = StepPlan(self._step)
        for request_id in view.preempted:
            if request_id in self._requests:
                self._requests[request_id].block_ids = []
        for sched in view.requests:
            req = self._requests.get(sched.request_id)
            if req is None:
                continue  # never looked up (should not happen): nothing to plan
            if sched.replace_blocks:
                req.block_ids = list(sched.block_ids or ())
            elif sched.block_ids:
                req.block_ids.extend(sched.block_ids)
            if req.pending_load is not None:
                plan.loads.append(self._load_spec(req))
                req.pending_load = None
            self._plan_store(req, sched.num_computed_tokens + sched.num_scheduled_tokens, plan)
        for request_id in view.finished:
            self._requests.pop(request_id, None)
        return plan

    def _slots(self, block_ids: Sequence[int], num_tokens: int) -> np.ndarray:
        positions = np.arange(num_tokens, dtype=np.int64)
        blocks = np.asarray(block_ids, dtype=np.int64)[positions // self.block_size]
        return blocks * self.block_size + positions % self.block_size

    def _load_spec(self, req: _Request) -> LoadSpec:
        """Chunks ``[0, hit)`` into the request's blocks; if its blocks cannot hold the chunks
        that cover vLLM's loaded range, an empty spec, which the workers report as failed."""
        local, end = req.pending_load
        first, last = local // self.block_size, -(-end // self.block_size)
        failed_blocks = list(req.block_ids[first:last])
        hit = min(req.hit, len(req.block_ids) * self.block_size)
        hit -= hit % self.chunk_size
        if hit < end:
            empty = np.zeros(0, dtype=np.int64)
            return LoadSpec(req.info.request_id, empty, empty.copy(), failed_blocks, req.info.seed, None)
        slots = self._slots(req.block_ids, hit)
        slots[:local] = -1
        tokens = np.asarray(req.info.token_ids[:hit], dtype=np.int64)
        return LoadSpec(req.info.request_id, tokens, slots, failed_blocks, req.info.seed,
                        self._extras(req.info, hit))

    def _plan_store(self, req: _Request, computed: int, plan: StepPlan) -> None:
        """``computed``: tokens with KV after this step (drafts included; ``token_ids`` caps them)."""
        if not (self.store and req.info.store):
            return
        end = min(computed, len(req.info.token_ids), len(req.block_ids) * self.block_size)
        end -= end % self.chunk_size
        if end <= req.stored_upto:
            return
        tokens = np.asarray(req.info.token_ids[:end], dtype=np.int64)
        plan.stores.append(StoreSpec(req.info.request_id, tokens, self._slots(req.block_ids, end),
                                     req.info.seed, self._extras(req.info, end)))
        req.stored_upto = end

    def finished(self, request_id: str) -> bool:
        """The request is done (finished, aborted or rejected): end its session. Returns whether
        vLLM must keep its blocks (never: stores are synchronous)."""
        req = self._requests.pop(request_id, None)
        if req is not None and req.opened:
            self.client.end_session(request_id)
        return False
