"""The books of a cache: registry, requests, shares and pins in L1, and the tier stack; no copies.

``CacheCore`` is what the embedded :class:`gpukv.CacheEngine` and the ``gpukv serve`` server
share. It speaks chunk hashes, instance ids and request owners, and hands out *grants*
(:mod:`gpukv.engine.grants`): a write
grant names the arena slots a worker must pack into (write-pinned until commit or abort), a
read grant the objects it may unpack from (pinned until ``end_retrieve``). Whoever holds a grant
runs the copy (the engine in-process, or the worker through the server) and then gives it back.

Requests: ``lookup`` opens the request (owner = the request's identity, opaque here) and tops
its shares up to ``readers`` per object (idempotent: repeated lookups take nothing more);
``free`` releases its shares on a chunk range or all; ``end_request`` releases all and forgets
it. A request whose read lease passed is forgotten by ``expire``.

The lower tiers (spill, loads, flush) are :class:`gpukv.engine.tier_stack.TierStack`, the running
totals :class:`gpukv.engine.counters.CoreCounters`, the metrics and events
:class:`gpukv.engine.observe.Observer`.
"""

from __future__ import annotations

import logging
import time
from typing import Hashable

from gpukv.config import EngineConfig
from gpukv.engine.counters import CoreCounters
from gpukv.engine.grants import ReadGrant, UnknownRequest, WriteGrant
from gpukv.engine.hit_sources import LookupHit, hit_runs, l1_source
from gpukv.engine.observe import Observer
from gpukv.engine.placement import Placement
from gpukv.engine.readers import resolve_extra_count
from gpukv.engine.registry import Instance, Registry
from gpukv.engine.requests import Busy, RequestTable
from gpukv.engine.tier_stack import TierStack
from gpukv.l1 import L1Manager, Status
from gpukv.l1.memory import ArenaMemory, create
from gpukv.l1.slab import SlabArena

log = logging.getLogger(__name__)


class CacheCore:
    """Registry, requests, L1 books and tiers of one cache (thread-safe)."""

    def __init__(self, config: EngineConfig | None = None, *, shared: bool = False) -> None:
        """``shared``: create the arenas so another process can map them (the server)."""
        self.config = config = config or EngineConfig()
        self.registry = Registry(config.chunk_size)
        self.observer = Observer(config, self.registry.space_of_key, self._kv_ranks)
        self.router = self.observer.router  # vLLM-format events (None unless configured)
        self.memories: list[ArenaMemory] = [
            create(d, config.capacity_bytes, shared=shared, prefault=config.prefault)
            for d in config.devices]
        on_event = self.observer.l1_event if self.observer.events is not None else None
        self.l1 = L1Manager(arenas=[SlabArena(config.capacity_bytes, memory=m.tensor)
                                    for m in self.memories],
                            read_lease_s=config.read_lease_s, write_lease_s=config.write_lease_s,
                            on_event=on_event)
        self.requests = RequestTable(config.max_requests)
        self.placement = Placement(config.devices, self.registry)
        self.stack = TierStack(config, self.l1, self.observer, self.registry.device_of_space)
        self.tiers = self.stack.tiers
        if self.observer.metrics is not None:
            self.observer.metrics.set_snapshot(self.metrics_snapshot)
            self.observer.metrics.set_before_scrape(
                lambda: self.observer.sync(self.l1.stats(), self.stack.stats()))
        self.counters = CoreCounters()
        self._last_expire = 0.0
        self._arena_kinds = [l1_source(d) for d in config.devices]

    @property
    def devices(self) -> tuple[str, ...]:
        return self.config.devices

    def _kv_ranks(self, model: str, tp_size: int) -> tuple[int, ...] | None:
        """The KV ranks of a chunk of ``model`` read by a TP group of ``tp_size`` (None: unknown)."""
        try:
            return tuple(space.kv_rank for space in self.registry.spaces(model, tp_size))
        except ValueError:
            return None

    # ---- registration ---------------------------------------------------------------------
    def register(self, instance_id: Hashable, model: str, layout: dict, *, kind: str,
                 tp_rank: int = 0, tp_size: int = 1, device: int = 0,
                 shared: bool = True) -> Instance:
        """``device``: the arena its stores go to; ``shared`` (MLA): one object per chunk for
        the whole TP group, spread over the arenas of the model's instances (every rank must be
        able to read all of them: :func:`gpukv.l1.topology.mla_shared`), else one per rank."""
        if isinstance(device, bool) or not isinstance(device, int) or not 0 <= device < len(self.devices):
            raise ValueError(f"device must be an arena index in [0, {len(self.devices)}), got {device!r}")
        inst = self.registry.register(instance_id, model, layout, kind=kind, tp_rank=tp_rank,
                                      tp_size=tp_size, device=device, shared=shared)
        self.observer.add_model(model)
        log.info("Registered %r: model=%s kind=%s tp=%d/%d layers=%d chunk=%d B device=%s",
                 instance_id, model, kind, tp_rank, tp_size, inst.num_layers, inst.chunk_bytes,
                 self.devices[device])
        return inst

    def unregister(self, instance_id: Hashable) -> None:
        """Forget an instance; its unfinished writes are discarded (a copy still running keeps
        its slots until it commits or aborts; its commit then stores nothing)."""
        inst = self.registry.unregister(instance_id)
        self.l1.release_owner(inst.writer)

    # ---- store ----------------------------------------------------------------------------
    def begin_store(self, instance_id: Hashable, hashes: list[bytes]) -> WriteGrant:
        """Reserve write slots for the chunks of ``hashes`` not held yet."""
        inst = self.registry.instance(instance_id)
        self._check_work(len(hashes))
        keys = inst.space.keys(hashes)
        statuses, handles = [None] * len(keys), [None] * len(keys)
        for device, where in self.placement.by_arena(inst, hashes).items():
            got = self.l1.reserve_write_slots([keys[i] for i in where], inst.chunk_bytes,
                                              device=device, owner=inst.writer)
            for i, status, handle in zip(where, *got):
                statuses[i], handles[i] = status, handle
        new = [i for i, s in enumerate(statuses) if s is Status.OK]
        return WriteGrant(inst, new, [handles[i] for i in new],
                         cached=sum(s is Status.NOT_WRITABLE for s in statuses),
                         full=sum(s is Status.OUT_OF_MEMORY for s in statuses))

    def commit_store(self, grant: WriteGrant) -> int:
        """The copy is complete: make the grant's chunks readable; returns how many became so
        (a write discarded meanwhile, e.g. by an unregister, stores nothing)."""
        statuses = self.l1.finish_write(grant.handles)
        ready = [h for h, s in zip(grant.handles, statuses) if s is Status.OK]
        fingerprint = self.registry.model(grant.instance.model).fingerprint
        self.stack.spill(ready, grant.instance.space, fingerprint)
        self.counters.add("stored_chunks", len(ready))
        inst = grant.instance
        self.observer.store(inst.model, len(ready), len(ready) * inst.chunk_bytes,
                            time.perf_counter() - grant.t0)
        return len(ready)

    def abort_store(self, grant: WriteGrant) -> None:
        self.l1.abort_write(grant.handles)

    # ---- lookup ---------------------------------------------------------------------------
    def lookup(self, model: str, hashes: list[bytes], *, request: Hashable, tp_size: int = 1,
               num_readers: int | None = None, creator: Hashable = None) -> int:
        """Leading chunks held for every rank; the request's shares topped up to ``readers``
        per object (MLA: ``num_readers or tp_size``; MHA: 1 per rank's object)."""
        return self._lookup(model, hashes, request, tp_size, num_readers, creator, False).chunks

    def lookup_tiers(self, model: str, hashes: list[bytes], *, request: Hashable, tp_size: int = 1,
                     num_readers: int | None = None, creator: Hashable = None) -> LookupHit:
        """:meth:`lookup`, with where each chunk of the hit came from
        (:mod:`gpukv.engine.hit_sources`)."""
        return self._lookup(model, hashes, request, tp_size, num_readers, creator, True)

    def _lookup(self, model: str, hashes: list[bytes], request: Hashable, tp_size: int,
                num_readers: int | None, creator: Hashable, tiers: bool) -> LookupHit:
        t0 = time.perf_counter()
        info = self.registry.model(model)
        extra = resolve_extra_count("mla" if info.shared else "mha", tp_size, num_readers)
        spaces = self.registry.spaces(model, tp_size)
        self._check_work(len(hashes) * len(spaces))
        self.maybe_expire()
        self.requests.open(request, model, spaces, hashes, creator=creator,
                           deadline=time.monotonic() + self.config.read_lease_s)
        keys = [space.keys(hashes) for space in spaces]
        prefix = self.l1.reserve_prefix(keys, extra, owner=request) if hashes else 0
        later: list[str] = []  # the source of each chunk after the L1 prefix
        if self.stack and prefix < len(hashes):
            later = self.stack.loader.extend(spaces, hashes, prefix, extra, request,
                                             info.fingerprint, info.chunk_bytes)
        hits = prefix + len(later)
        per_tier: dict[str, int] = {}
        for name in later:
            per_tier[name] = per_tier.get(name, 0) + 1
        n_l1 = prefix + per_tier.pop("L1", 0)
        self.counters.lookup(n_l1, per_tier)
        cs = self.config.chunk_size
        if self.observer.metrics is not None:
            tokens = {"L1": n_l1 * cs}
            for name, n in per_tier.items():
                tokens[name] = n * cs
            self.observer.lookup(model, len(hashes) * cs, tokens, time.perf_counter() - t0)
        log.debug("Lookup %r: %d/%d prefix chunks (%d L1, %s)", request, hits, len(hashes), n_l1,
                  per_tier)
        return LookupHit(hits, hit_runs(self.l1.device_of, self._arena_kinds, keys, prefix, later)
                         if tiers else None)

    def covered_by_l1(self, model: str, hashes: list[bytes], tp_size: int = 1) -> bool:
        """Whether every rank's object of every chunk is ready in L1 now (a lookup that would
        not touch a tier; the answer may change before the lookup runs, which is harmless)."""
        try:
            spaces = self.registry.spaces(model, tp_size)
        except ValueError:
            return True  # an unknown model fails fast, without a tier
        return all(self.l1.prefix_hits(s.keys(hashes)) == len(hashes) for s in spaces)

    # ---- retrieve -------------------------------------------------------------------------
    def begin_retrieve(self, instance_id: Hashable, hashes: list[bytes], *,
                       request: Hashable) -> ReadGrant | None:
        """Pin the objects of ``hashes`` for an unpack; None (nothing pinned) if any is missing.
        UnknownRequest if the request never looked up."""
        inst = self.registry.instance(instance_id)
        self._check_work(len(hashes))
        if request not in self.requests:
            self.observer.retrieve_failed("unknown_request")
            raise UnknownRequest(f"unknown request {request!r}: look it up first")
        statuses, handles = self.l1.pin(inst.space.keys(hashes))
        if any(s is not Status.OK for s in statuses):
            self.l1.unpin([h for h in handles if h is not None])
            self.counters.add("failed_retrieves")
            missing = next(s for s in statuses if s is not Status.OK)
            self.observer.retrieve_failed("not_ready" if missing is Status.NOT_READY else "not_found")
            return None
        return ReadGrant(inst, request, handles)

    def end_retrieve(self, grant: ReadGrant) -> int:
        """The copy is complete: release one of the request's shares per object (where it
        still holds one) and unpin; returns the shares released."""
        grant.released = self.l1.end_read(grant.handles, owner=grant.request)
        self.counters.add("retrieved_chunks", len(grant.handles))
        inst = grant.instance
        self.observer.retrieve(inst.model, len(grant.handles), len(grant.handles) * inst.chunk_bytes,
                               time.perf_counter() - grant.t0)
        return grant.released

    # ---- request lifecycle ----------------------------------------------------------------
    def free(self, request: Hashable, *, start_chunk: int = 0, end_chunk: int | None = None) -> int:
        """Release the request's shares on chunks ``[start_chunk, end_chunk)`` (all by default);
        returns how many."""
        if start_chunk == 0 and end_chunk is None:
            return self.l1.release_owner(request)
        req = self.requests.get(request)
        if req is None:
            return 0
        return self.l1.release_owner(request, req.keys(start_chunk, end_chunk))

    def end_request(self, request: Hashable) -> int:
        """Release everything the request holds and forget it; returns the shares released."""
        self.requests.pop(request)
        return self.l1.release_owner(request)

    def maybe_expire(self, *, every_s: float = 1.0) -> None:
        now = time.monotonic()
        if now - self._last_expire > every_s:
            self._last_expire = now
            self.expire()

    def expire(self) -> int:
        """Enforce leases: expired shares and writes, and forget requests past their lease."""
        released = self.l1.expire()
        for req in self.requests.prune(time.monotonic()):
            released += self.l1.release_owner(req.owner)
        return released

    # ---- misc -----------------------------------------------------------------------------
    def stats(self) -> dict:
        out = self.counters.snapshot()
        out.update(instances=self.registry.num_instances, models=self.registry.snapshot(),
                   open_requests=len(self.requests), devices=list(self.devices),
                   l1=self.l1.stats(), tiers=self.stack.stats())
        if self.stack.spiller is not None:
            out["spill"] = dict(self.stack.spiller.counts, queue_depth=self.stack.queue_depth)
        if self.router is not None:
            out["vllm_events"] = self.router.stats()
        return out

    def metrics_snapshot(self, clients: int | None = None) -> dict:
        """The metrics' scrape-time gauges (:mod:`gpukv.ops.snapshot`)."""
        return self.observer.snapshot(self.l1.stats(), self.stack.stats(),
                                      spill_depth=self.stack.queue_depth,
                                      open_requests=len(self.requests), clients=clients)

    def object_states(self, model: str, hashes: list[bytes], *, kv_rank: int = 0) -> dict:
        """Per chunk object of one rank: ``read_counts`` (shares held by requests),
        ``present`` (ready) and ``evictable`` (ready, unlocked, unpinned)."""
        spaces = self.registry.spaces(model, kv_rank + 1)
        keys = spaces[min(kv_rank, len(spaces) - 1)].keys(hashes)
        return dict(read_counts=[self.l1.read_count(k) for k in keys],
                    present=[k in self.l1 for k in keys],
                    evictable=[self.l1.is_evictable(k) for k in keys])

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every spilled chunk has reached every tier; False on timeout."""
        return self.stack.flush(timeout_s)

    def close(self, flush_timeout_s: float = 10.0) -> None:
        """Flush what is queued for the lower tiers, then stop: ``flush_timeout_s`` bounds the
        whole (what is still queued after it is dropped, counted)."""
        self.stack.close(flush_timeout_s)
        self.observer.close()

    def _check_work(self, num_keys: int) -> None:
        if num_keys > self.config.max_keys_per_request:
            raise Busy(f"one call may name at most {self.config.max_keys_per_request} chunk "
                       f"objects (chunks x ranks), got {num_keys}")

