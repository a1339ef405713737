"""pack: paged KV -> contiguous chunks in the L1 arena (Triton kernel, launcher, torch reference)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpukv_kernels.paged_copy import (check_compiled_or_interpreted, launch_meta, row_cols,
                                       token_tile)


@triton.jit
def _pack_kernel(table_ptr, slot_ptr, offs_ptr, arena_ptr,
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
        vals = tl.load(base + page_off[:, None] + page_col[None, :], mask=mask)
        tl.store(arena_ptr + arena_off[:, None] + chunk_col[None, :], vals, mask=mask)


def pack_triton(paged, slots: torch.Tensor, arena: torch.Tensor, offsets: torch.Tensor, *,
                chunk_size: int) -> None:
    """Launch the pack kernel: one launch for all layers, K/V and chunks.

    Preconditions (checked by :func:`gpukv.copy.validate`): ``slots`` int64 on the cache's device
    with ``len(offsets) * chunk_size`` entries in ``[-1, num_slots)``; ``offsets`` CPU int64,
    16-aligned, non-overlapping, inside ``arena`` (1-D uint8, the cache's device).
    """
    check_compiled_or_interpreted(_pack_kernel, arena)
    m = launch_meta(paged, arena, offsets, slots, chunk_size)
    _pack_kernel[m["grid"]](
        m["table"], m["slots"], m["offsets"], m["arena"],
        m["num_tokens"], m["block_size"], m["chunk_size"],
        m["stride_block"], m["stride_token"], m["stride_head"], m["row_words"], m["head_words"],
        WORD=m["WORD"], BLOCK_T=m["BLOCK_T"], BLOCK_R=m["BLOCK_R"])


def pack_ref(paged, slots: torch.Tensor, arena: torch.Tensor, offsets: torch.Tensor, *,
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
                    src = paged.views[layer][kv][block, pos]  # [H, D]
                    start = off + ((layer * paged.num_kv + kv) * chunk_size + i) * row
                    arena[start:start + row] = _row_bytes(src)


def _row_bytes(x: torch.Tensor) -> torch.Tensor:
    """The bytes of an ``[H, D]`` view, head-major (a copy)."""
    return x.contiguous().view(torch.uint8).flatten()
