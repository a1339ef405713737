"""A load or store job's copies across a worker's KV cache groups (:mod:`.kv_groups`): each
group's share of the spec (:class:`GroupRow`: which chunks it copies, the slot mapping of their
blocks; a spec's ``blocks`` has one row per group, :mod:`.plan`), and the job run over all of
them, all or nothing (:func:`run_load`, :func:`run_store`).

- A load writes a chunk into a group where any of its blocks is a block to write (``-1``: vLLM
  already holds it, or a sliding window's null block); a chunk with none is not even read.
- A store copies a chunk from a group only where all its blocks are the request's (``-1``: a
  sliding window's block that vLLM may have freed, see :mod:`.kv_groups`); that group does not
  hold the chunk then.
- A job begins every group's copy (a load pins every group's objects) before it claims the
  bytes; if one cannot begin, the others are aborted and nothing moves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from gpukv.integrations.vllm.plan import block_slots


def group_rows(hashes: list[bytes], row: np.ndarray, block_size: int, *, store: bool
               ) -> tuple[list[bytes], np.ndarray]:
    """(the chunks' hashes, their int64 slot mapping) that one group copies of a spec whose
    ``hashes`` cover ``row`` (that group's blocks, ``len(row) // len(hashes)`` per chunk)."""
    if not hashes:
        return [], np.zeros(0, dtype=np.int64)
    per_chunk = len(row) // len(hashes)
    if per_chunk * len(hashes) != len(row):
        raise ValueError(f"{len(row)} blocks do not split into {len(hashes)} chunks")
    live = np.asarray(row).reshape(len(hashes), per_chunk) >= 0
    keep = live.all(axis=1) if store else live.any(axis=1)
    if keep.all():
        return list(hashes), block_slots(row, block_size)
    kept = np.flatnonzero(keep)
    blocks = np.asarray(row).reshape(len(hashes), per_chunk)[kept].reshape(-1)
    return [hashes[i] for i in kept], block_slots(blocks, block_size)


@dataclass(frozen=True, slots=True)
class GroupRow:
    """One group's share of a job: its instance, the chunks' hashes and slot mapping, the
    server request id of its part (loads) and one token's bytes in its pages."""

    instance_id: str
    hashes: list[bytes]
    slots: torch.Tensor
    request_id: str
    token_bytes: int


def rows_of(instances: Sequence[str], request_ids: Sequence[str], token_bytes: Sequence[int],
            hashes: list[bytes], blocks: np.ndarray, block_size: int, *, store: bool) -> list[GroupRow]:
    """The rows of the groups that copy anything (one instance, part request id and token size
    per group, in the order of ``blocks``' rows)."""
    out = []
    for g, instance in enumerate(instances):
        chunks, slots = group_rows(hashes, blocks[g], block_size, store=store)
        if chunks:
            out.append(GroupRow(instance, chunks, torch.from_numpy(slots), request_ids[g], token_bytes[g]))
    return out


def run_load(client: Any, job: Any, rows: list[GroupRow]) -> int | None:
    """Retrieve every row into vLLM's pages (``job``: a :class:`.transfers.Job`, layer by layer
    when it has layers); the bytes written, or None when nothing was (a chunk missing, or the
    job cancelled before it claimed the copy)."""
    copies = []
    for row in rows:  # every group's objects pinned, or none
        copy = client.begin_retrieve_chunks(row.instance_id, row.hashes, row.slots, request_id=row.request_id)
        if copy is None or (copy.grant is None and copy.tokens == 0):  # a chunk is missing
            _abort(client, copies)
            return None
        copies.append(copy)
    if not job.claim():  # the step gave up on it: nothing written
        _abort(client, copies)
        return None
    for copy in copies:
        if copy.grant is None:
            continue
        for layer in range(len(job.layers)):  # layer by layer, each fenced (one group)
            client.copy_layers(copy, layer + 1).wait()
            job.layer_copied(layer)
        if copy.layers_queued < copy.num_layers:
            client.copy_layers(copy).wait()
    job.end_copy(True)
    for copy in copies:
        client.finish(copy)  # the end of the retrieve: its shares go (the bytes are in)
    return sum(int((row.slots >= 0).sum()) * row.token_bytes for row in rows)  # -1 slots: not written


def run_store(client: Any, job: Any, rows: list[GroupRow]) -> tuple[int, int] | None:
    """Store every row (chunks already cached are skipped); (tokens newly stored by the group
    that stored most, bytes newly stored), or None when nothing was committed (the server
    failed a call, or the job was cancelled before it claimed the copy)."""
    copies = []
    for row in rows:
        copy = client.begin_store_chunks(row.instance_id, row.hashes, row.slots)
        if copy is None:  # the server failed the call (logged by the guard)
            _abort(client, [c for _, c in copies])
            return None
        if copy.grant is not None:  # else every chunk is cached already
            copies.append((row.token_bytes, copy))
    if not copies:
        job.end_copy(True)
        return 0, 0
    if not job.claim():  # cancelled (preempted, or the step gave up): nothing committed
        _abort(client, [c for _, c in copies])
        return None
    for _, copy in copies:
        client.copy_layers(copy).wait()
    job.end_copy(True)
    stored = [(nbytes, client.finish(copy)) for nbytes, copy in copies]  # the commits
    return max(n for _, n in stored), sum(b * n for b, n in stored)


def _abort(client: Any, copies: list) -> None:
    for copy in copies:
        client.abort(copy)
