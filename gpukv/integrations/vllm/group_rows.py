"""One KV cache group's share of a load or store: which of a spec's chunks that group copies, and
the slot mapping of their blocks (a spec's ``blocks`` has one row per group, :mod:`.plan`).

- A load writes a chunk into a group where any of its blocks is a block to write (``-1``: vLLM
  already holds it, or a sliding window's null block); a chunk with none is not even read.
- A store copies a chunk from a group only where all its blocks are the request's (``-1``: a
  sliding window's block that vLLM may have freed, see :mod:`.kv_groups`); that group does not
  hold the chunk then.
"""

from __future__ import annotations

import numpy as np

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
