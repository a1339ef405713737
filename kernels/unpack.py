"""unpack: contiguous chunks in the L1 arena -> paged KV (Triton kernel, launcher, torch reference)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpukv.layout import INT_BY_SIZE
from gpukv_kernels.paged_copy import (check_compiled_or_interpreted, launch_meta, row_cols,
                                       token_tile)


@triton.jit
def _unpack_kernel(table_ptr, slot_ptr, offs_ptr, arena_ptr,
                   num_tokens, block_size, chunk_size,
                   stride_block, stride_token, stride_head, row_words, head_words,
                   WORD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_lk = tl.program_id(1)
    base = tl.load(table_ptr + pid_lk).to(tl.pointer_type(WORD))
    page_off, arena_off, valid = token_tile(slot_ptr, offs_ptr, pid_t, num_tokens, block_size,
                                            chunk_size, stride_block, stride_token, pid_lk,
                                            row_words, BLOCK_T)
    for r0 in range(0, row_words, BLOCK_R):
        page_col, chunk_col, r_mask = row_cols(r0, row_words, head_words, stride_head, BLOCK_R)
        mask = valid[:, None] & r_mask[None, :]
        vals = tl.load(arena_ptr + arena_off[:, None] + chunk_col[None, :], mask=mask)
        tl.store(base + page_off[:, None] + page_col[None, :], vals, mask=mask)


def unpack_triton(paged, slots: torch.Tensor, arena: torch.Tensor, offsets: torch.Tensor, *,
                  chunk_size: int) -> None:
    """Launch the unpack kernel; preconditions as in :func:`gpukv_kernels.pack.pack_triton`."""
    check_compiled_or_interpreted(_unpack_kernel, arena)
    m = launch_meta(paged, arena, offsets, slots, chunk_size)
    _unpack_kernel[m["grid"]](
        m["table"], m["slots"], m["offsets"], m["arena"],
        m["num_tokens"], m["block_size"], m["chunk_size"],
        m["stride_block"], m["stride_token"], m["stride_head"], m["row_words"], m["head_words"],
        WORD=m["WORD"], BLOCK_T=m["BLOCK_T"], BLOCK_R=m["BLOCK_R"])


def unpack_ref(paged, slots: torch.Tensor, arena: torch.Tensor, offsets: torch.Tensor, *,
               chunk_size: int) -> None:
    """The obviously-correct reference: token by token, layer by layer, through byte views."""
    row = paged.row_bytes
    for c, off in enumerate(offsets.tolist()):
        for i in range(chunk_size):
            slot = int(slots[c * chunk_size + i])
            if slot < 0:
                continue
            block, pos = divmod(slot, paged.block_size)
            for layer in range(paged.num_layers):
                for kv in range(paged.num_kv):
                    dst = paged.views[layer][kv][block, pos]  # [H, D]
                    start = off + ((layer * paged.num_kv + kv) * chunk_size + i) * row
                    word = INT_BY_SIZE[dst.element_size()]
                    dst.view(word).copy_(arena[start:start + row].view(word).view(dst.shape))
