"""The embedded cache engine: what an inference worker imports to use gpukv in-process.

Data path (see DESIGN.md): ``store`` hashes the full chunks of a prompt, reserves L1 slots for the
new ones, packs them out of the worker's pages in one kernel call and spills them to the lower
tiers off the hot path; ``lookup`` counts the leading chunks held (L1, then disk, then remote) and
takes reader shares for them, owned by the request; ``retrieve`` unpacks them into a rank's pages
and releases one share per object. For MLA one object serves the whole TP group, so a lookup with
``tp_size=N`` takes N shares and each rank's retrieve releases one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Hashable

import torch

from gpukv.config import EngineConfig
from gpukv.paged.copy import check_slot_mapping, pack, unpack
from gpukv.engine.keys import ObjectKey, TokenIds, chunk_hashes
from gpukv.l1 import MAX_READERS, L1Manager, Status
from gpukv.paged.layout import PagedKV
from gpukv.engine.readers import resolve_extra_count
from gpukv.engine.spill import SPILL_OWNER, Spiller
from gpukv.engine.loader import TierLoader

log = logging.getLogger(__name__)

MAX_REQUESTS = 1 << 16  # request ids remembered for retrieve (a request normally ends first)


@dataclass(slots=True)
class _Instance:
    instance_id: str
    model: str
    paged: PagedKV
    kv_rank: int
    tp_rank: int
    tp_size: int


@dataclass(slots=True)
class _Model:
    kind: str
    fingerprint: str
    chunk_bytes: int
    instances: set = field(default_factory=set)


@dataclass(slots=True)
class _Counters:
    stored_chunks: int = 0
    lookups: int = 0
    hit_chunks_l1: int = 0
    hit_chunks_tier: dict = field(default_factory=dict)
    retrieved_chunks: int = 0
    failed_retrieves: int = 0


class CacheEngine:
    """An in-process gpukv: L1 slab on the worker's device, optional disk and remote tiers."""

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self.device = torch.device(self.config.device)
        self.l1 = L1Manager(self.config.capacity_bytes, device=self.device,
                            read_lease_s=self.config.read_lease_s,
                            write_lease_s=self.config.write_lease_s)
        self.tiers = []
        if self.config.disk_dir is not None:
            from gpukv.tiers.disk import DiskTier

            self.tiers.append(DiskTier(self.config.disk_dir,
                                       capacity_bytes=self.config.disk_capacity_bytes))
        if self.config.remote_url is not None:
            from gpukv.tiers.remote import RemoteTier

            self.tiers.append(RemoteTier(self.config.remote_url,
                                         timeout_s=self.config.remote_timeout_s))
        self._spiller = Spiller(self.l1, self.tiers) if self.tiers else None
        self._loader = TierLoader(self.l1, self.tiers)
        self._lock = threading.Lock()
        self._instances: dict[Hashable, _Instance] = {}
        self._models: dict[str, _Model] = {}
        # request id -> model it looked up; bounded: the oldest are forgotten past MAX_REQUESTS
        # (their remaining shares still end with free_lookup_locks or their lease)
        self._requests: OrderedDict[Hashable, str] = OrderedDict()
        self._counters = _Counters()
        self._seed = self.config.salt.encode()
        self._last_expire = 0.0

    # ---- registration ---------------------------------------------------------------------
    def register(self, instance_id: Hashable, model: str, kv_caches, dims: str, *, kind: str = "mha",
                 tp_rank: int = 0, tp_size: int = 1) -> None:
        """Describe one worker's paged KV cache (see :meth:`PagedKV.from_tensors`).

        All instances of one ``model`` must have the same layout fingerprint. MHA instances key
        their chunks by ``tp_rank``; MLA instances share objects across the TP group.
        """
        if not isinstance(model, str) or not model or "/" in model and model.strip("/") != model:
            raise ValueError(f"model must be a non-empty str, got {model!r}")
        if not isinstance(tp_size, int) or not 1 <= tp_size <= MAX_READERS:
            raise ValueError(f"tp_size must be an int in [1, {MAX_READERS}], got {tp_size!r}")
        if not isinstance(tp_rank, int) or not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank must be an int in [0, tp_size={tp_size}), got {tp_rank!r}")
        paged = PagedKV.from_tensors(kv_caches, dims, kind=kind)
        if paged.device != self.device and not (
            paged.device.type == self.device.type == "cuda" and self.device.index is None
        ):
            raise ValueError(f"kv_caches are on {paged.device}, the engine's L1 is on {self.device}")
        fingerprint = f"model={model};chunk={self.config.chunk_size};{paged.fingerprint()}"
        with self._lock:
            if instance_id in self._instances:
                raise ValueError(f"instance {instance_id!r} is already registered")
            info = self._models.get(model)
            if info is not None and info.fingerprint != fingerprint:
                raise ValueError(
                    f"instance {instance_id!r}: layout of model {model!r} differs from the "
                    f"registered one ({fingerprint} != {info.fingerprint})"
                )
            if info is None:
                info = self._models[model] = _Model(paged.kind, fingerprint,
                                                    paged.chunk_bytes(self.config.chunk_size))
            info.instances.add(instance_id)
            kv_rank = 0 if paged.kind == "mla" else tp_rank
            self._instances[instance_id] = _Instance(instance_id, model, paged, kv_rank, tp_rank, tp_size)
        log.info("Registered %s: model=%s kind=%s tp=%d/%d layers=%d chunk=%d B", instance_id, model,
                 paged.kind, tp_rank, tp_size, paged.num_layers, info.chunk_bytes)

    def unregister(self, instance_id: Hashable) -> None:
        """Forget an instance (its stored chunks stay cached for other instances)."""
        with self._lock:
            inst = self._instance(instance_id)
            del self._instances[instance_id]
            self._models[inst.model].instances.discard(instance_id)
        self.l1.release_owner(("store", instance_id))

    # ---- store ----------------------------------------------------------------------------
    def store(self, instance_id: Hashable, token_ids: TokenIds, slot_mapping: torch.Tensor) -> int:
        """Pack the full chunks of ``token_ids`` not cached yet; returns tokens newly stored.

        ``slot_mapping``: int64/int32, one page slot per token (``len(token_ids)`` entries,
        ``-1`` = padding, skipped). The worker's writes to those slots must be complete (on CUDA:
        ordered before this call on the current stream, or synchronized).
        """
        inst = self._instance(instance_id)
        hashes = chunk_hashes(token_ids, self.config.chunk_size, seed=self._seed)
        slots = self._check_slots(slot_mapping, len(token_ids), inst.paged)
        if not hashes:
            return 0
        keys = self._keys(inst.model, inst.kv_rank, hashes)
        info = self._models[inst.model]
        owner = ("store", instance_id)
        statuses = self.l1.reserve_write(keys, info.chunk_bytes, owner=owner)
        new = [i for i, s in enumerate(statuses) if s is Status.OK]
        if not new:
            return 0
        new_keys = [keys[i] for i in new]
        cs = self.config.chunk_size
        idx = torch.cat([torch.arange(i * cs, (i + 1) * cs) for i in new])
        t0 = time.perf_counter()
        try:
            arena, offsets = self.l1.locate(new_keys)
            pack(inst.paged, slots[idx], arena, offsets, chunk_size=cs, backend=self.config.backend)
        except BaseException:
            self.l1.abort_write(new_keys, owner=owner)
            raise
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        elapsed = time.perf_counter() - t0
        if self._spiller is not None:
            self._spiller.spill(new_keys, info.fingerprint, owner=owner)
        else:
            self.l1.finish_write(new_keys, owner=owner)
        with self._lock:
            self._counters.stored_chunks += len(new)
        nbytes = len(new) * info.chunk_bytes
        log.info("Stored %d tokens in %.3f s (%.2f GB/s)", len(new) * cs, elapsed,
                 nbytes / max(elapsed, 1e-9) / 1e9)
        return len(new) * cs

    # ---- lookup ---------------------------------------------------------------------------
    def lookup(self, model: str, token_ids: TokenIds, *, request_id: Hashable, tp_size: int = 1,
               num_readers: int | None = None) -> int:
        """Leading tokens held for ``model``; takes reader shares owned by ``request_id``.

        MLA: ``num_readers`` (default ``tp_size``) shares per object, one per rank that will
        retrieve. MHA: one share on each TP rank's object (``kv_rank`` 0..tp_size-1). Chunks after
        the first miss are not locked; tier hits are loaded into L1 as temporary objects.
        """
        hashes = chunk_hashes(token_ids, self.config.chunk_size, seed=self._seed)
        return self.lookup_hashes(model, hashes, request_id=request_id, tp_size=tp_size,
                                  num_readers=num_readers)

    def lookup_hashes(self, model: str, hashes: list[bytes], *, request_id: Hashable,
                      tp_size: int = 1, num_readers: int | None = None) -> int:
        """:meth:`lookup` on precomputed :func:`chunk_hashes` (what the server receives)."""
        info = self._model(model)
        extra = resolve_extra_count(info.kind, tp_size, num_readers)
        ranks = [0] if info.kind == "mla" else list(range(tp_size))
        self._maybe_expire()
        keys = [self._keys(model, r, hashes) for r in ranks]
        with self._lock:
            self._requests[request_id] = model
            self._requests.move_to_end(request_id)
            while len(self._requests) > MAX_REQUESTS:
                self._requests.popitem(last=False)
            self._counters.lookups += 1
        # L1 prefix, all ranks at once (one reserve_read call)
        n_l1 = min(self.l1.prefix_hits(k) for k in keys) if hashes else 0
        if n_l1:
            taken = [k[i] for k in keys for i in range(n_l1)]
            statuses = self.l1.reserve_read(taken, extra, owner=request_id)
            failed = [j % n_l1 for j, s in enumerate(statuses) if s is not Status.OK]
            if failed:  # evicted between prefix_hits and reserve_read: keep the shorter prefix
                cut = min(failed)
                self._release(request_id, [key for j, (key, s) in enumerate(zip(taken, statuses))
                                           if s is Status.OK and j % n_l1 >= cut], extra)
                n_l1 = cut
        hits, per_tier = n_l1, {}
        if self.tiers:
            hits, later_l1, per_tier = self._loader.extend(keys, n_l1, extra, request_id,
                                                           info.fingerprint, info.chunk_bytes)
            n_l1 += later_l1
        with self._lock:
            self._counters.hit_chunks_l1 += n_l1
            for name, n in per_tier.items():
                self._counters.hit_chunks_tier[name] = self._counters.hit_chunks_tier.get(name, 0) + n
        detail = ", ".join([f"{n_l1} L1"] + [f"{n} {name}" for name, n in per_tier.items()])
        log.info("Lookup req=%s: %d/%d prefix chunks (%s)", request_id, hits, len(hashes), detail)
        return hits * self.config.chunk_size

    # ---- retrieve -------------------------------------------------------------------------
    def retrieve(self, instance_id: Hashable, token_ids: TokenIds, slot_mapping: torch.Tensor, *,
                 request_id: Hashable) -> int:
        """Unpack the full chunks of ``token_ids`` (the prefix a lookup found) into the pages.

        All-or-nothing: if any chunk is missing it returns 0 and writes nothing. Releases one of
        ``request_id``'s shares per object (an object this request holds no share of is read
        under a share taken and released within the call).
        """
        inst = self._instance(instance_id)
        with self._lock:
            if request_id not in self._requests:
                raise ValueError(f"unknown request {request_id!r}: call lookup() first")
        hashes = chunk_hashes(token_ids, self.config.chunk_size, seed=self._seed)
        slots = self._check_slots(slot_mapping, len(token_ids), inst.paged)
        if not hashes:
            return 0
        keys = self._keys(inst.model, inst.kv_rank, hashes)
        held = [self.l1.held(k, request_id) > 0 for k in keys]
        borrow = [k for k, h in zip(keys, held) if not h]
        statuses = self.l1.reserve_read(borrow, 0, owner=request_id) if borrow else []
        if any(s is not Status.OK for s in statuses):
            self._release(request_id, [k for k, s in zip(borrow, statuses) if s is Status.OK], 0)
            with self._lock:
                self._counters.failed_retrieves += 1
            log.info("Retrieve req=%s: %d/%d chunks missing, nothing written", request_id,
                     sum(s is not Status.OK for s in statuses), len(keys))
            return 0
        cs = self.config.chunk_size
        t0 = time.perf_counter()
        try:
            arena, offsets = self.l1.locate(keys)
            unpack(inst.paged, slots[: len(keys) * cs], arena, offsets, chunk_size=cs,
                   backend=self.config.backend)
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
        finally:
            self._release(request_id, keys, 0)
        elapsed = time.perf_counter() - t0
        with self._lock:
            self._counters.retrieved_chunks += len(keys)
        nbytes = len(keys) * self._models[inst.model].chunk_bytes
        log.info("Retrieved %d tokens in %.3f s (%.2f GB/s)", len(keys) * cs, elapsed,
                 nbytes / max(elapsed, 1e-9) / 1e9)
        return len(keys) * cs

    # ---- request lifecycle ----------------------------------------------------------------
    def free_lookup_locks(self, request_id: Hashable) -> int:
        """Release every share ``request_id`` still holds; returns how many."""
        return self.l1.release_owner(request_id)

    def end_session(self, request_id: Hashable) -> None:
        """Release what the request holds and forget it."""
        self.l1.release_owner(request_id)
        with self._lock:
            self._requests.pop(request_id, None)

    # ---- misc -----------------------------------------------------------------------------
    def stats(self) -> dict:
        with self._lock:
            c = self._counters
            out = dict(instances=len(self._instances), models=sorted(self._models),
                       open_requests=len(self._requests), stored_chunks=c.stored_chunks,
                       lookups=c.lookups, hit_chunks_l1=c.hit_chunks_l1,
                       hit_chunks_tier=dict(c.hit_chunks_tier),
                       retrieved_chunks=c.retrieved_chunks, failed_retrieves=c.failed_retrieves)
        out["l1"] = self.l1.stats()
        out["tiers"] = {t.name: t.stats() for t in self.tiers}
        return out

    def read_count(self, model: str, token_ids: TokenIds, *, kv_rank: int = 0) -> list[int]:
        """Readers' shares on each full chunk's object (for tests, notebooks and debugging)."""
        hashes = chunk_hashes(token_ids, self.config.chunk_size, seed=self._seed)
        return self.object_states(model, hashes, kv_rank=kv_rank)["read_counts"]

    def object_states(self, model: str, hashes: list[bytes], *, kv_rank: int = 0) -> dict:
        """Per chunk object: ``read_counts`` (shares held by requests; the spill thread's
        transient share is not a reader's), ``present`` (ready or read-locked) and ``evictable``."""
        keys = self._keys(model, kv_rank, hashes)
        return dict(read_counts=[self.l1.read_count(k) - self.l1.held(k, SPILL_OWNER) for k in keys],
                    present=[k in self.l1 for k in keys],
                    evictable=[self.l1.is_evictable(k) for k in keys])

    def clear_l1(self) -> int:
        """Drop every ready, unlocked L1 object (lower tiers keep theirs)."""
        return self.l1.clear()

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every spilled chunk has reached every tier."""
        ok = True
        if self._spiller is not None:
            ok = self._spiller.flush(timeout_s)
        return all([t.flush(timeout_s) for t in self.tiers]) and ok

    def close(self, flush_timeout_s: float | None = 10.0) -> None:
        """Flush what is queued for the lower tiers (up to ``flush_timeout_s``), then stop."""
        if self.tiers:
            self.flush(flush_timeout_s)
        if self._spiller is not None:
            self._spiller.close()
        for tier in self.tiers:
            tier.close()

    def __enter__(self) -> "CacheEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- helpers --------------------------------------------------------------------------
    def _instance(self, instance_id: Hashable) -> _Instance:
        inst = self._instances.get(instance_id)
        if inst is None:
            raise ValueError(f"unknown instance {instance_id!r}: register() it first")
        return inst

    def _model(self, model: str) -> _Model:
        info = self._models.get(model)
        if info is None:
            raise ValueError(f"unknown model {model!r}: no instance registered it")
        return info

    def _keys(self, model: str, kv_rank: int, hashes: list[bytes]) -> list[ObjectKey]:
        return [ObjectKey(model, kv_rank, h, self.config.salt) for h in hashes]

    def _release(self, request_id: Hashable, keys: list[ObjectKey], extra: int) -> None:
        if keys:
            statuses = self.l1.finish_read(keys, extra, owner=request_id)
            assert all(s is Status.OK for s in statuses), statuses

    def _check_slots(self, slot_mapping: torch.Tensor, num_tokens: int, paged: PagedKV) -> torch.Tensor:
        """Validate a slot mapping before any share is taken or any byte moves."""
        check_slot_mapping(paged, slot_mapping, num_tokens, f"one per token ({num_tokens})")
        return slot_mapping

    def _maybe_expire(self) -> None:
        now = time.monotonic()
        if now - self._last_expire > 1.0:
            self._last_expire = now
            self.l1.expire()
