"""pack: paged KV -> contiguous chunks in the L1 arena (Triton launcher and the torch reference).

The kernel itself, shared with unpack, is :func:`gpukv_kernels.paged_copy.paged_copy_kernel`.
"""

from __future__ import annotations

import torch

from gpukv_kernels.paged_copy import launch, ref_rows


def pack_triton(paged, slots: torch.Tensor, arena: torch.Tensor, offsets: torch.Tensor, *,
                chunk_size: int) -> None:
    """Launch the pack kernel: one launch for all layers, K/V and chunks.

    Preconditions (checked by :func:`gpukv.paged.copy.validate`): ``slots`` int64 on the cache's device
    with ``len(offsets) * chunk_size`` entries in ``[-1, num_slots)``; ``offsets`` CPU int64,
    16-aligned, non-overlapping, inside ``arena`` (1-D uint8, the cache's device).
    """
    launch(paged, slots, arena, offsets, chunk_size=chunk_size, pack=True)


def pack_ref(paged, slots: torch.Tensor, arena: torch.Tensor, offsets: torch.Tensor, *,
             chunk_size: int) -> None:
    """The obviously-correct reference: token by token, layer by layer, through byte views."""
    row = paged.row_bytes
    for src, start in ref_rows(paged, slots, offsets, chunk_size):
        arena[start:start + row] = src.contiguous().view(torch.uint8).flatten()
