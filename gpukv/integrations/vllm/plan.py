"""The step plan: what the scheduler side hands every worker for one engine step, and the plain
values the planner reads from vLLM (the connector translates vLLM's objects, see
:mod:`.translate`; nothing here imports vLLM).

The workers see no requests: all they load or store reaches them in a :class:`StepPlan`, by chunk
hash (hashed once, on the scheduler side: :mod:`.chain`) and block id. Under
pipeline parallelism each stage's workers run the same plan on their own layers, under their
stage's request id on the server (:func:`stage_request_id`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from gpukv.integrations.vllm.keys import MMItem
from gpukv.integrations.vllm.kv_groups import part_request_id


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
    resumed request (``replace_blocks``), else the blocks added this step (or None); one list per
    KV cache group (a flat list for a model with one group)."""

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
    """Retrieve the chunks ``hashes`` (a prefix of the request's chain, from chunk 0) into
    ``blocks`` (int32, one row per KV cache group: the chunks' blocks in token order,
    ``chunk_size // block_size`` per chunk; ``-1`` for a block that is not written: one vLLM
    already holds, or a sliding window's null block). ``report_blocks``: the blocks (of group 0)
    vLLM counts as loaded, reported if the load fails. No hashes: the load cannot be done (the
    request's blocks do not reach the end of the chunks to load); the workers report it failed."""

    request_id: str
    hashes: list[bytes]
    blocks: np.ndarray
    report_blocks: list[int]

    def num_tokens(self, chunk_size: int) -> int:
        return len(self.hashes) * chunk_size


@dataclass(slots=True)
class StoreSpec:
    """Store the chunks ``hashes`` -- only the request's chunks not planned for storing before,
    in chain order -- from ``blocks`` (int32, one row per KV cache group: the chunks' blocks in
    token order; ``-1`` where a group's block may no longer be the request's: that group does not
    store the chunk, see :mod:`.kv_groups`)."""

    request_id: str
    hashes: list[bytes]
    blocks: np.ndarray


def block_slots(blocks: np.ndarray, block_size: int) -> np.ndarray:
    """The int64 slot mapping of whole ``blocks``, one group's row (``-1`` blocks give ``-1``
    slots)."""
    blocks = np.asarray(blocks, dtype=np.int64)
    slots = blocks[:, None] * block_size + np.arange(block_size, dtype=np.int64)
    slots[blocks < 0] = -1
    return slots.reshape(-1)


@dataclass(slots=True)
class StepPlan:
    """What the workers do in one engine step (carried in the connector metadata). It names only
    this step's new work: each chunk's hash once, when it is loaded or stored, and its blocks.

    ``released``: finished requests whose blocks vLLM kept because a copy of them may still be
    running (a load planned in a step that may not have run when they finished -- the abort
    fence, see :mod:`.planner` -- or an asynchronous store that may still read its blocks);
    every worker reports each of them finished (vLLM's ``finished_sending``) once the copies of
    it that it ran or queued are done with its blocks. ``preempted``: requests vLLM preempted
    this step (it freed their blocks): a worker waits for any store still reading them before
    the step's forward may overwrite them."""

    step: int
    loads: list[LoadSpec] = field(default_factory=list)
    stores: list[StoreSpec] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)

    def nbytes(self) -> int:
        """The plan's payload: hashes, block arrays and request ids (what grows with the work)."""
        total = sum(len(r) for r in (*self.released, *self.preempted))
        for spec in (*self.loads, *self.stores):
            total += len(spec.request_id) + sum(len(h) for h in spec.hashes) + spec.blocks.nbytes
        return total + sum(4 * len(spec.report_blocks) for spec in self.loads)


def stage_request_id(request_id: str, stage: int, num_stages: int) -> str:
    """The server's request id of one pipeline stage's part of a one-group request (see
    :func:`.kv_groups.part_request_id`)."""
    return part_request_id(request_id, stage, num_stages)


def group_lists(block_ids: Sequence, num_groups: int) -> list[list[int]]:
    """Block ids as one list per KV cache group: ``block_ids`` is one list per group (vLLM's
    tuple), or, for a model with one group, that group's flat list."""
    if num_groups == 1 and all(isinstance(b, (int, np.integer)) for b in block_ids):
        return [list(block_ids)]
    lists = [list(ids) for ids in block_ids]
    if len(lists) != num_groups:
        raise ValueError(f"block ids of {len(lists)} KV cache groups, the engine has {num_groups}")
    return lists
