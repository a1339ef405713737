"""``RequestBooks``: what the scheduler side knows of one request (its lookup's answer and shares,
its blocks, its chain of chunk hashes, what was planned for it) and the load or store a step plans
from that: only hashes and blocks, never its tokens (:class:`.planner.SchedulerPlanner` owns the
rules; this owns one request's arithmetic).

- A load covers chunks ``[0, hit)`` into the request's blocks, block ``-1`` for the blocks vLLM
  already holds; if its blocks cannot hold the chunks that cover vLLM's loaded range, the spec
  has no hashes and the workers report its blocks failed. Loaded chunks are never stored again.
- A store covers the chunks fully computed after a step (and held in the request's blocks) that
  were never planned before: their hashes (each chunk hashed once, by :mod:`.chain`) and blocks.
- Blocks are per KV cache group (:mod:`.kv_groups`): a sliding window's null blocks are never
  written by a load, and its blocks vLLM may have freed are not stored from.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from gpukv.integrations.vllm.chain import ChunkChain
from gpukv.integrations.vllm.kv_groups import NULL_BLOCK, ONE_GROUP, KVGroup
from gpukv.integrations.vllm.plan import LoadSpec, RequestInfo, StoreSpec


@dataclass(slots=True)
class RequestBooks:
    """One request's books. ``block_ids``: its block table per KV cache group (as the planner
    last saw it: a sliding window's blocks vLLM freed since are not marked; see
    :meth:`store_spec`)."""

    info: RequestInfo
    chain: ChunkChain
    hit: int | None = None  # chunk-aligned tokens every part holds (shares taken); None: no answer yet
    looked_up_at: float = 0.0
    first_asked: float = 0.0
    pending: list[Future] | None = None  # lookups sent, answers not taken yet
    local: int = 0  # vLLM's own hit at the last lookup call
    admitted: bool = False
    pending_load: tuple[int, int] | None = None  # (local, vLLM's loaded end)
    load_step: int | None = None  # the step whose plan carries its latest load
    loading: bool = False  # an asynchronous load planned, not reported done by every worker
    store_step: int | None = None  # the latest step that planned a store since its last preemption
    block_ids: list[list[int]] = field(default_factory=lambda: [[]])
    stored_upto: int = 0  # tokens whose chunks are planned for storing (or were loaded)
    opened: bool = False  # a lookup was sent: the server may hold a request to end

    @property
    def num_blocks(self) -> int:
        """Blocks every group's table has (vLLM keeps them the same length)."""
        return min(len(ids) for ids in self.block_ids)

    def load_spec(self, chunk_size: int, block_size: int, groups: Sequence[KVGroup] = ONE_GROUP) -> LoadSpec:
        """The pending load (see the module docstring); chunks it covers are never stored."""
        local, end = self.pending_load
        bs, per_chunk = block_size, chunk_size // block_size
        report = list(self.block_ids[0][local // bs:-(-end // bs)])
        hit = min(self.hit, self.num_blocks * bs)
        hit -= hit % chunk_size
        if hit < end:
            return LoadSpec(self.info.request_id, [], np.zeros((len(groups), 0), dtype=np.int32), report)
        num_chunks = hit // chunk_size
        blocks = self._rows(num_chunks * per_chunk, 0, groups)
        blocks[:, :local // bs] = -1  # vLLM's own blocks: not written
        self.stored_upto = max(self.stored_upto, hit)  # gpukv holds them: never stored again
        return LoadSpec(self.info.request_id, self.chain.hashes[:num_chunks], blocks, report)

    def store_spec(self, computed: int, chunk_size: int, block_size: int, groups: Sequence[KVGroup] = ONE_GROUP,
                   *, scheduled_from: int = 0) -> StoreSpec | None:
        """The chunks to store after a step that leaves ``computed`` tokens with KV (drafts
        included; ``token_ids`` caps them); None when no chunk is new. ``scheduled_from``: the
        tokens computed when the step was scheduled (a sliding window's blocks before its window
        then may have been freed: ``-1``)."""
        end = min(computed, len(self.info.token_ids), self.num_blocks * block_size)
        end -= end % chunk_size
        if end <= self.stored_upto:
            return None
        first, last = self.stored_upto // chunk_size, end // chunk_size
        per_chunk = chunk_size // block_size
        hashes = self.chain.extend(self.info.token_ids, last)[first:last]
        blocks = self._rows(last * per_chunk, first * per_chunk, groups)
        for row, group in enumerate(groups):
            live = group.live_from(scheduled_from)
            if live:
                blocks[row, :max(0, live // block_size - first * per_chunk)] = -1
        self.stored_upto = end
        return StoreSpec(self.info.request_id, hashes, blocks)

    def _rows(self, stop: int, start: int, groups: Sequence[KVGroup]) -> np.ndarray:
        """Blocks ``[start, stop)`` of every group, int32, a sliding window's null blocks -1."""
        if len(groups) != len(self.block_ids):
            raise ValueError(f"request {self.info.request_id!r} has block tables of {len(self.block_ids)} "
                             f"KV cache groups, the engine {len(groups)}")
        rows = np.asarray([ids[start:stop] for ids in self.block_ids], dtype=np.int32).reshape(len(groups), -1)
        for row, group in enumerate(groups):
            if group.sliding:
                rows[row][rows[row] == NULL_BLOCK] = -1
        return rows
