"""Which gpukv tier served each token vLLM loads: the scheduler side's answer to vLLM's
``get_external_cache_hit_sources`` (its ``vllm:prompt_tokens_cached_by_source`` metric) and to
the connector stats' hit tokens per tier (nothing here imports vLLM).

:class:`TierLookups` stands in for the client the planner calls: its lookups ask the server for
the hit's per-chunk sources (LOOKUP with ``tiers``, :mod:`gpukv.engine.hit_sources`) and
remember them per request; every other call goes to the client unchanged. A repeated lookup
(vLLM asks again while a request waits; the planner tops its shares up) keeps the first
answer's source for the chunks it already covered: a chunk loaded from disk by the first lookup
sits in L1 for the second one, but disk is where it came from.

gpukv's sources map to vLLM's ``CacheHitSource`` (:data:`VLLM_SOURCE`): ``gpu`` (an L1 arena in
GPU memory) -> ``device``, ``cpu`` (an L1 arena in host memory) -> ``host``, ``disk`` -> ``disk``,
``remote`` (Redis / Valkey) -> ``external_unspecified`` (vLLM's class for a remote store; the
connector stats name it ``remote``).
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

from gpukv.engine.hit_sources import farthest

VLLM_SOURCE = {"gpu": "DEVICE", "cpu": "HOST", "disk": "DISK", "remote": "EXTERNAL_UNSPECIFIED"}


class TierLookups:
    """The planner's client with per-request hit sources (see the module docstring).
    ``client``: a :class:`.guard.GuardedClient` (``lookup_tiers`` / ``lookup_hashes_tiers``)."""

    def __init__(self, client: Any, chunk_size: int) -> None:
        self.client, self.chunk_size = client, chunk_size
        self._lock = threading.Lock()  # lookups run on the calls thread, reads on the scheduler's
        self._sources: dict[Any, list[str] | None] = {}

    def lookup(self, model: str, token_ids: Any, *, request_id: Any, **options: Any) -> int:
        hit = self.client.lookup_tiers(model, token_ids, request_id=request_id, **options)
        self._record(request_id, hit)
        return hit.chunks * self.chunk_size

    def lookup_hashes(self, model: str, hashes: list[bytes], *, request_id: Any, **options: Any) -> int:
        hit = self.client.lookup_hashes_tiers(model, hashes, request_id=request_id, **options)
        self._record(request_id, hit)
        return hit.chunks * self.chunk_size

    def __getattr__(self, name: str) -> Any:  # free_lookup_locks, end_session, ...
        return getattr(self.client, name)

    def _record(self, request_id: Any, hit: Any) -> None:
        new = hit.per_chunk()
        with self._lock:
            old = self._sources.get(request_id)
            if new is not None and old:
                new = old[:len(new)] + new[len(old):]  # the first answer knows where they came from
            self._sources[request_id] = new

    def split(self, request_ids: Sequence[Any], start: int, num_tokens: int) -> dict[str, int] | None:
        """Tokens ``[start, start + num_tokens)`` of a request per gpukv source; ``request_ids``:
        its server request id per pipeline stage (a chunk counts for the farthest source of its
        stages). None when a stage's sources are not known (a server that cannot say), or do
        not cover the range."""
        with self._lock:
            stages = [self._sources.get(rid) for rid in request_ids]
        if not stages or any(s is None for s in stages):
            return None
        per_chunk = list(stages[0])
        for other in stages[1:]:
            per_chunk = [farthest(a, b) for a, b in zip(per_chunk, other)]
        end, cs = start + num_tokens, self.chunk_size
        if end > len(per_chunk) * cs:
            return None
        out: dict[str, int] = {}
        for c in range(start // cs, -(-end // cs)):
            tokens = min(end, (c + 1) * cs) - max(start, c * cs)
            out[per_chunk[c]] = out.get(per_chunk[c], 0) + tokens
        return out

    def forget(self, request_ids: Sequence[Any]) -> None:
        with self._lock:
            for rid in request_ids:
                self._sources.pop(rid, None)
