"""The embedded cache engine: what an inference worker imports to use gpukv in-process.

Data path (see DESIGN.md): ``store`` hashes the full chunks of a prompt, reserves L1 slots for the
new ones, packs them out of the worker's pages in one kernel call per arena and commits them
(spilled to the lower tiers off the hot path); ``lookup`` counts the leading chunks held (L1, then
disk, then remote) and tops up the request's reader shares; ``retrieve`` pins them, unpacks them
into a rank's pages and releases one share per object. For MLA one object serves the whole TP
group, so a lookup with ``tp_size=N`` takes N shares and each rank's retrieve releases one.
Every copy holds its pins for its whole duration: nothing it reads or writes can be freed or
handed to another caller under it.

The books live in :class:`gpukv.engine.core.CacheCore`, shared with ``gpukv serve``; this class
adds the worker's pages and runs the copies.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Hashable, Sequence

import torch

from gpukv.config import EngineConfig
from gpukv.engine.chunks import (by_device, chunk_slots, chunks_to_read, describe, full_chunks,
                                 token_range)
from gpukv.engine.core import CacheCore, RetrievePlan, StorePlan
from gpukv.engine.keys import TokenIds, chunk_hashes, request_seed
from gpukv.paged.copy import check_slot_mapping, pack, unpack
from gpukv.paged.layout import PagedKV

log = logging.getLogger(__name__)


class CacheEngine:
    """An in-process gpukv: L1 arenas on the worker's device(s), optional disk and remote tiers."""

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self.core = CacheCore(self.config)
        self.l1, self.tiers = self.core.l1, self.core.tiers
        self.device = torch.device(self.config.devices[0])
        self._pages: dict[Hashable, PagedKV] = {}
        self._lock = threading.Lock()

    # ---- registration ---------------------------------------------------------------------
    def register(self, instance_id: Hashable, model: str, kv_caches, dims: str, *,
                 kind: str = "mha", tp_rank: int = 0, tp_size: int = 1,
                 device: str | None = None) -> None:
        """Describe one worker's paged KV cache (see :meth:`PagedKV.from_tensors`): a list,
        tuple or dict name -> tensor (layer order) of the engine's own tensors.

        ``device`` names the arena its stores go to (default: the first arena on the pages'
        device type). All instances of one ``model`` must have the same layout fingerprint.
        MHA instances key their chunks by ``tp_rank``; MLA instances share objects across ranks.
        """
        _hashable(instance_id, "instance_id")
        if isinstance(kv_caches, dict):
            kv_caches = list(kv_caches.values())
        paged = PagedKV.from_tensors(kv_caches, dims, kind=kind)
        arena = self._arena_for(paged, device)
        with self._lock:
            if instance_id in self._pages:
                raise ValueError(f"instance {instance_id!r} is already registered")
            self.core.register(instance_id, model, describe(paged), kind=paged.kind,
                               tp_rank=tp_rank, tp_size=tp_size, device=arena)
            self._pages[instance_id] = paged

    def unregister(self, instance_id: Hashable) -> None:
        """Forget an instance (its stored chunks stay cached for other instances)."""
        with self._lock:
            self._paged(instance_id)
            self.core.unregister(instance_id)
            del self._pages[instance_id]

    # ---- store ----------------------------------------------------------------------------
    def store(self, instance_id: Hashable, token_ids: TokenIds, slot_mapping: torch.Tensor, *,
              seed: bytes = b"", extras=None) -> int:
        """Pack the full chunks of ``token_ids`` not cached yet; returns tokens really stored.

        ``slot_mapping``: int64/int32, one page slot per token (``len(token_ids)`` entries;
        a chunk with any ``-1`` slot is not stored). The worker's writes to those slots must be
        complete (on CUDA: ordered before this call on the current stream).
        """
        paged = self._paged(instance_id)
        hashes = self._hashes(token_ids, seed, extras)
        cs = self.config.chunk_size
        check_slot_mapping(paged, slot_mapping, len(token_ids), f"one per token ({len(token_ids)})")
        chunks = full_chunks(slot_mapping, len(hashes), cs)
        if not chunks:
            return 0
        plan = self.core.begin_store(instance_id, [hashes[i] for i in chunks])
        if not plan.handles:
            return 0
        t0 = time.perf_counter()
        try:
            self._copy(pack, paged, slot_mapping, plan, [chunks[i] for i in plan.chunks])
        except BaseException:
            self.core.abort_store(plan)
            raise
        stored = self.core.commit_store(plan)
        _log_rate("Stored", stored * cs, stored * plan.instance.chunk_bytes, t0)
        return stored * cs

    # ---- lookup ---------------------------------------------------------------------------
    def lookup(self, model: str, token_ids: TokenIds, *, request_id: Hashable, tp_size: int = 1,
               num_readers: int | None = None, seed: bytes = b"", extras=None) -> int:
        """Leading tokens held for ``model``; tops up reader shares owned by ``request_id``.

        MLA: ``num_readers`` (default ``tp_size``) shares per object, one per rank that will
        retrieve. MHA: one share on each TP rank's object (``kv_rank`` 0..tp_size-1). A repeated
        lookup of the same request takes no more shares than the first (it tops up to the
        target). Chunks after the first miss are not locked; tier hits are loaded into L1 as
        temporary objects.
        """
        _hashable(request_id, "request_id")
        hashes = self._hashes(token_ids, seed, extras)
        return self.lookup_hashes(model, hashes, request_id=request_id, tp_size=tp_size,
                                  num_readers=num_readers)

    def lookup_hashes(self, model: str, hashes: list[bytes], *, request_id: Hashable,
                      tp_size: int = 1, num_readers: int | None = None) -> int:
        """:meth:`lookup` on precomputed :func:`chunk_hashes`."""
        _hashable(request_id, "request_id")
        return self.core.lookup(model, hashes, request=request_id, tp_size=tp_size,
                                num_readers=num_readers) * self.config.chunk_size

    # ---- retrieve -------------------------------------------------------------------------
    def retrieve(self, instance_id: Hashable, token_ids: TokenIds, slot_mapping: torch.Tensor, *,
                 request_id: Hashable, seed: bytes = b"", extras=None) -> int:
        """Unpack the full chunks of ``token_ids`` (the prefix a lookup found) into the pages.

        Returns the tokens of that prefix (``len(token_ids) // chunk_size * chunk_size``) once
        they are in the pages, or 0 (nothing written) if any chunk it had to read is missing:
        all or nothing. A chunk whose slots are all ``-1`` is not read (the caller has it:
        vLLM's own prefix cache hit); other ``-1`` slots are skipped. The objects are pinned for
        the whole copy; afterwards one of ``request_id``'s shares per object read is released
        (where it still holds one: a ``free_lookup_locks`` in the middle of the copy cannot make
        it read another prompt's bytes). ValueError for a request that never looked up.
        """
        _hashable(request_id, "request_id")
        paged = self._paged(instance_id)
        hashes = self._hashes(token_ids, seed, extras)
        check_slot_mapping(paged, slot_mapping, len(token_ids), f"one per token ({len(token_ids)})")
        cs = self.config.chunk_size
        chunks = chunks_to_read(slot_mapping, len(hashes), cs)
        if not chunks:
            return len(hashes) * cs
        plan = self.core.begin_retrieve(instance_id, [hashes[i] for i in chunks], request=request_id)
        if plan is None:
            log.debug("Retrieve %r: a chunk is missing, nothing written", request_id)
            return 0
        t0 = time.perf_counter()
        try:
            self._copy(unpack, paged, slot_mapping, plan, chunks)
        finally:
            self.core.end_retrieve(plan)
        _log_rate("Retrieved", len(chunks) * cs, len(chunks) * plan.instance.chunk_bytes, t0)
        return len(hashes) * cs

    # ---- request lifecycle ----------------------------------------------------------------
    def free_lookup_locks(self, request_id: Hashable, *, start_token: int = 0,
                          end_token: int | None = None) -> int:
        """Release the shares ``request_id`` holds on the chunks inside
        ``[start_token, end_token)`` (all of them by default; e.g. ``end_token=engine_hit``
        for the part the engine already had); returns how many."""
        _hashable(request_id, "request_id")
        start, end = token_range(start_token, end_token, self.config.chunk_size)
        return self.core.free(request_id, start_chunk=start, end_chunk=end)

    def end_session(self, request_id: Hashable) -> None:
        """Release what the request holds and forget it."""
        _hashable(request_id, "request_id")
        self.core.end_request(request_id)

    # ---- misc -----------------------------------------------------------------------------
    def stats(self) -> dict:
        return self.core.stats()

    def read_count(self, model: str, token_ids: TokenIds, *, kv_rank: int = 0,
                   seed: bytes = b"") -> list[int]:
        """Readers' shares on each full chunk's object (for tests, notebooks and debugging)."""
        return self.object_states(model, self._hashes(token_ids, seed, None),
                                  kv_rank=kv_rank)["read_counts"]

    def object_states(self, model: str, hashes: list[bytes], *, kv_rank: int = 0) -> dict:
        return self.core.object_states(model, hashes, kv_rank=kv_rank)

    def object_keys(self, model: str, token_ids: TokenIds, *, kv_rank: int = 0,
                    seed: bytes = b"") -> list[tuple[bytes, str]]:
        """``(L1 key, tier key)`` of each full chunk's object of one rank (tests, debugging)."""
        space = self.core.registry.spaces(model, kv_rank + 1)[-1 if kv_rank else 0]
        keys = space.keys(self._hashes(token_ids, seed, None))
        return [(k, space.tier_key(k)) for k in keys]

    def clear_l1(self) -> int:
        """Drop every ready, unlocked, unpinned L1 object (lower tiers keep theirs)."""
        return self.l1.clear()

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every spilled chunk has reached every tier; False on timeout."""
        return self.core.flush(timeout_s)

    def close(self, flush_timeout_s: float = 10.0) -> None:
        """Flush what is queued for the lower tiers (up to ``flush_timeout_s``), then stop."""
        self.core.close(flush_timeout_s)

    def __enter__(self) -> "CacheEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- helpers --------------------------------------------------------------------------
    def _hashes(self, token_ids: TokenIds, seed: bytes, extras) -> list[bytes]:
        return chunk_hashes(token_ids, self.config.chunk_size,
                            seed=request_seed(self.config.salt, seed), extras=extras)

    def _paged(self, instance_id: Hashable) -> PagedKV:
        _hashable(instance_id, "instance_id")
        paged = self._pages.get(instance_id)
        if paged is None:
            raise ValueError(f"unknown instance {instance_id!r}: register() it first")
        return paged

    def _arena_for(self, paged: PagedKV, device: str | None) -> int:
        names = self.config.devices
        if device is not None:
            if device not in names:
                raise ValueError(f"device {device!r} is not one of this engine's arenas {names}")
            index = names.index(device)
        else:
            index = next((i for i, n in enumerate(names)
                          if torch.device(n).type == paged.device.type), None)
            if index is None:
                raise ValueError(f"kv_caches are on {paged.device}, the engine's arenas on {names}")
        if torch.device(names[index]).type != paged.device.type:
            raise ValueError(f"kv_caches are on {paged.device}, arena {names[index]!r} is not")
        return index

    def _copy(self, op, paged: PagedKV, slots: torch.Tensor, plan: StorePlan | RetrievePlan,
              chunks: Sequence[int]) -> None:
        """``op`` (pack/unpack) of ``chunks[i]``'s slots with ``plan.handles[i]``, one call per
        arena; synchronizes the current stream on CUDA (the copy is complete on return)."""
        cs = self.config.chunk_size
        chunks = list(chunks)
        for device, where in by_device(plan.handles).items():
            arena = self.l1.arena(device)
            offsets = torch.tensor([plan.handles[i].offset for i in where], dtype=torch.int64)
            op(paged, chunk_slots(slots, [chunks[i] for i in where], cs), arena, offsets,
               chunk_size=cs, backend=self.config.backend)
        if paged.device.type == "cuda":
            torch.cuda.current_stream(paged.device).synchronize()


def _hashable(value, name: str) -> None:
    try:
        hash(value)
    except TypeError:
        raise TypeError(f"{name} must be hashable (a str or an int), got "
                        f"{type(value).__name__} {value!r:.60}") from None


def _log_rate(what: str, tokens: int, nbytes: int, t0: float) -> None:
    elapsed = time.perf_counter() - t0
    log.info("%s %d tokens in %.3f s (%.2f GB/s)", what, tokens, elapsed,
              nbytes / max(elapsed, 1e-9) / 1e9)
