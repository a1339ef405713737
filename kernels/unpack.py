"""unpack: contiguous chunks in the L1 arena -> paged KV (Triton launcher and the torch reference).

The kernel itself, shared with pack, is :func:`gpukv_kernels.paged_copy.paged_copy_kernel`.
"""

from __future__ import annotations

import torch

from gpukv.paged.layout import INT_BY_SIZE
from gpukv_kernels.paged_copy import launch, ref_rows


def unpack_triton(paged, slots: torch.Tensor, arena: torch.Tensor, offsets: torch.Tensor, *,
                  chunk_size: int) -> None:
    """Launch the unpack kernel; preconditions as in :func:`gpukv_kernels.pack.pack_triton`."""
    launch(paged, slots, arena, offsets, chunk_size=chunk_size, pack=False)


def unpack_ref(paged, slots: torch.Tensor, arena: torch.Tensor, offsets: torch.Tensor, *,
               chunk_size: int) -> None:
    """The obviously-correct reference: token by token, layer by layer, through byte views."""
    row = paged.row_bytes
    for dst, start in ref_rows(paged, slots, offsets, chunk_size):
        word = INT_BY_SIZE[dst.element_size()]
        dst.view(word).copy_(arena[start:start + row].view(word).view(dst.shape))
