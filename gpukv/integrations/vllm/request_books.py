"""``RequestBooks``: what the scheduler side knows of one request (its lookup's answer and shares,
its blocks, its chain of chunk hashes, what was planned for it) and the load or store a step plans
from that: only hashes and blocks, never its tokens (:class:`.planner.SchedulerPlanner` owns the
rules; this owns one request's arithmetic).

- A load covers chunks ``[0, hit)`` into the request's blocks, block ``-1`` for the blocks vLLM
  already holds; if its blocks cannot hold the chunks that cover vLLM's loaded range, the spec
  has no hashes and the workers report its blocks failed. Loaded chunks are never stored again.
- A store covers the chunks fully computed after a step (and held in the request's blocks) that
  were never planned before: their hashes (each chunk hashed once, by :mod:`.chain`) and blocks.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from gpukv.integrations.vllm.chain import ChunkChain
from gpukv.integrations.vllm.plan import LoadSpec, RequestInfo, StoreSpec


@dataclass(slots=True)
class RequestBooks:
    """One request's books. Per KV cache group state (its blocks, its chain) is ``block_ids`` and
    ``chain`` of the one group the connector serves."""

    info: RequestInfo
    chain: ChunkChain
    hit: int | None = None  # chunk-aligned tokens every stage holds (shares taken); None: no answer yet
    looked_up_at: float = 0.0
    first_asked: float = 0.0
    pending: list[Future] | None = None  # lookups sent, answers not taken yet
    local: int = 0  # vLLM's own hit at the last lookup call
    admitted: bool = False
    pending_load: tuple[int, int] | None = None  # (local, vLLM's loaded end)
    load_step: int | None = None  # the step whose plan carries its latest load
    loading: bool = False  # an asynchronous load planned, not reported done by every worker
    store_step: int | None = None  # the latest step that planned a store since its last preemption
    block_ids: list[int] = field(default_factory=list)
    stored_upto: int = 0  # tokens whose chunks are planned for storing (or were loaded)
    opened: bool = False  # a lookup was sent: the server may hold a request to end

    def load_spec(self, chunk_size: int, block_size: int) -> LoadSpec:
        """The pending load (see the module docstring); chunks it covers are never stored."""
        local, end = self.pending_load
        bs, per_chunk = block_size, chunk_size // block_size
        report = list(self.block_ids[local // bs:-(-end // bs)])
        hit = min(self.hit, len(self.block_ids) * bs)
        hit -= hit % chunk_size
        if hit < end:
            return LoadSpec(self.info.request_id, [], np.zeros(0, dtype=np.int32), report)
        num_chunks = hit // chunk_size
        blocks = np.asarray(self.block_ids[:num_chunks * per_chunk], dtype=np.int32)
        blocks[:local // bs] = -1  # vLLM's own blocks: not written
        self.stored_upto = max(self.stored_upto, hit)  # gpukv holds them: never stored again
        return LoadSpec(self.info.request_id, self.chain.hashes[:num_chunks], blocks, report)

    def store_spec(self, computed: int, chunk_size: int, block_size: int) -> StoreSpec | None:
        """The chunks to store after a step that leaves ``computed`` tokens with KV (drafts
        included; ``token_ids`` caps them); None when no chunk is new."""
        end = min(computed, len(self.info.token_ids), len(self.block_ids) * block_size)
        end -= end % chunk_size
        if end <= self.stored_upto:
            return None
        first, last = self.stored_upto // chunk_size, end // chunk_size
        per_chunk = chunk_size // block_size
        hashes = self.chain.extend(self.info.token_ids, last)[first:last]
        blocks = np.asarray(self.block_ids[first * per_chunk:last * per_chunk], dtype=np.int32)
        self.stored_upto = end
        return StoreSpec(self.info.request_id, hashes, blocks)
