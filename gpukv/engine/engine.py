"""The embedded cache engine: what an inference worker imports to use gpukv in-process.

``store`` hashes the full chunks of a prompt, reserves L1 slots for the new ones, packs them out of
the worker's pages and commits them (spilled to the lower tiers off the hot path); ``lookup``
counts the leading chunks held (L1, then disk, then remote) and tops up the request's reader
shares; ``retrieve`` pins them, unpacks them into a rank's pages and releases one share per
object. For MLA one object serves the whole TP group, so a lookup with ``tp_size=N`` takes N
shares and each rank's retrieve releases one.

The books are a :class:`gpukv.engine.core.CacheCore` in this process (shared with ``gpukv serve``);
the copies are :class:`gpukv.engine.copies.WorkerCopies`, the same data path a
:class:`gpukv.CacheClient` runs against the server.
"""

from __future__ import annotations

from typing import Hashable

import torch

from gpukv.config import EngineConfig
from gpukv.engine.books import LocalBooks
from gpukv.engine.chunks import check_id, token_range
from gpukv.engine.copies import WorkerCopies
from gpukv.engine.core import CacheCore
from gpukv.engine.hit_sources import LookupHit
from gpukv.engine.keys import TokenIds
from gpukv.engine.worker_path import WorkerPath


class CacheEngine(WorkerPath):
    """An in-process gpukv: L1 arenas on the worker's device(s), optional disk and remote tiers."""

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self.core = CacheCore(self.config)
        self.l1, self.tiers = self.core.l1, self.core.tiers
        self.device = torch.device(self.config.devices[0])
        self.copies = WorkerCopies(LocalBooks(self.core), backend=self.config.backend)

    # ---- registration and copies: WorkerPath (register, store, retrieve, ...), and ----------
    def unregister(self, instance_id: Hashable) -> None:
        """Forget an instance (its stored chunks stay cached for other instances)."""
        self.copies.unregister(instance_id)

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
        check_id(request_id, "request_id")
        return self.lookup_hashes(model, self.copies.hashes(token_ids, seed, extras),
                                  request_id=request_id, tp_size=tp_size, num_readers=num_readers)

    def lookup_hashes(self, model: str, hashes: list[bytes], *, request_id: Hashable,
                      tp_size: int = 1, num_readers: int | None = None) -> int:
        """:meth:`lookup` on precomputed :func:`chunk_hashes`."""
        check_id(request_id, "request_id")
        return self.core.lookup(model, hashes, request=request_id, tp_size=tp_size,
                                num_readers=num_readers) * self.config.chunk_size

    def lookup_tiers(self, model: str, token_ids: TokenIds, *, request_id: Hashable,
                     tp_size: int = 1, num_readers: int | None = None, seed: bytes = b"",
                     extras=None) -> LookupHit:
        """:meth:`lookup`, with where each chunk of the hit came from (in chunks; see
        :mod:`gpukv.engine.hit_sources`)."""
        check_id(request_id, "request_id")
        return self.core.lookup_tiers(model, self.copies.hashes(token_ids, seed, extras),
                                      request=request_id, tp_size=tp_size, num_readers=num_readers)

    # ---- request lifecycle ----------------------------------------------------------------
    def free_lookup_locks(self, request_id: Hashable, *, start_token: int = 0,
                          end_token: int | None = None) -> int:
        """Release the shares ``request_id`` holds on the chunks inside
        ``[start_token, end_token)`` (all of them by default; e.g. ``end_token=engine_hit``
        for the part the engine already had); returns how many."""
        check_id(request_id, "request_id")
        start, end = token_range(start_token, end_token, self.config.chunk_size)
        return self.core.free(request_id, start_chunk=start, end_chunk=end)

    def end_session(self, request_id: Hashable) -> None:
        """Release what the request holds and forget it."""
        check_id(request_id, "request_id")
        self.core.end_request(request_id)

    # ---- misc -----------------------------------------------------------------------------
    def stats(self) -> dict:
        return self.core.stats()

    def read_count(self, model: str, token_ids: TokenIds, *, kv_rank: int = 0,
                   seed: bytes = b"") -> list[int]:
        """Readers' shares on each full chunk's object (for tests, notebooks and debugging)."""
        return self.object_states(model, self.copies.hashes(token_ids, seed),
                                  kv_rank=kv_rank)["read_counts"]

    def object_states(self, model: str, hashes: list[bytes], *, kv_rank: int = 0) -> dict:
        return self.core.object_states(model, hashes, kv_rank=kv_rank)

    def object_keys(self, model: str, token_ids: TokenIds, *, kv_rank: int = 0,
                    seed: bytes = b"") -> list[tuple[bytes, str]]:
        """``(L1 key, tier key)`` of each full chunk's object of one rank (tests, debugging)."""
        space = self.core.registry.spaces(model, kv_rank + 1)[-1 if kv_rank else 0]
        keys = space.keys(self.copies.hashes(token_ids, seed))
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
