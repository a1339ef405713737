"""Shared Triton helpers of the pack/unpack kernels and their launch metadata.

A program copies ``BLOCK_T`` tokens x one (layer, K/V) pair. Addresses are in *words*: the widest
integer (8/4/2/1 bytes) dividing the head size, the strides, the base addresses and the arena, so
bf16, fp16, fp32, fp8 and opaque records are one code path and the interpreter never does float
math. Per-layer base addresses come from an int64 table, cast to pointers in the kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from gpukv.paged.layout import word_bytes

MAX_TILE = 4096  # words one program moves per step

_WORDS = {8: (torch.int64, tl.int64), 4: (torch.int32, tl.int32), 2: (torch.int16, tl.int16),
          1: (torch.uint8, tl.uint8)}


@triton.jit
def token_tile(slot_ptr, offs_ptr, pid_t, num_tokens, block_size, chunk_size,
               stride_block, stride_token, pid_lk, row_words, BLOCK_T: tl.constexpr):
    """Word offsets of the tile's tokens in the pages (src) and the arena (dst), and the mask."""
    t = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_range = t < num_tokens
    slot = tl.load(slot_ptr + t, mask=in_range, other=-1).to(tl.int64)
    valid = in_range & (slot >= 0)
    slot = tl.where(valid, slot, 0)
    page_off = (slot // block_size) * stride_block + (slot % block_size) * stride_token
    chunk = t // chunk_size
    chunk_off = tl.load(offs_ptr + chunk, mask=in_range, other=0)
    arena_off = chunk_off + (pid_lk.to(tl.int64) * chunk_size + t % chunk_size) * row_words
    return page_off, arena_off, valid


@triton.jit
def row_cols(r0, row_words, head_words, stride_head, BLOCK_R: tl.constexpr):
    """Word offsets of row columns ``r0 .. r0 + BLOCK_R`` in the pages (head-strided) and the chunk."""
    r = r0 + tl.arange(0, BLOCK_R)
    r_mask = r < row_words
    page_col = (r // head_words).to(tl.int64) * stride_head + r % head_words
    return page_col, r.to(tl.int64), r_mask


@triton.jit
def paged_copy_kernel(table_ptr, slot_ptr, offs_ptr, arena_ptr,
                      num_tokens, block_size, chunk_size,
                      stride_block, stride_token, stride_head, row_words, head_words,
                      WORD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
                      PACK: tl.constexpr):
    """One tile: ``BLOCK_T`` tokens of one (layer, K/V); PACK copies pages -> arena, else back."""
    pid_t = tl.program_id(0)
    pid_lk = tl.program_id(1)
    base = tl.load(table_ptr + pid_lk).to(tl.pointer_type(WORD))
    page_off, arena_off, valid = token_tile(slot_ptr, offs_ptr, pid_t, num_tokens, block_size,
                                            chunk_size, stride_block, stride_token, pid_lk,
                                            row_words, BLOCK_T)
    for r0 in range(0, row_words, BLOCK_R):
        page_col, chunk_col, r_mask = row_cols(r0, row_words, head_words, stride_head, BLOCK_R)
        mask = valid[:, None] & r_mask[None, :]
        page_ptrs = base + page_off[:, None] + page_col[None, :]
        arena_ptrs = arena_ptr + arena_off[:, None] + chunk_col[None, :]
        if PACK:
            tl.store(arena_ptrs, tl.load(page_ptrs, mask=mask), mask=mask)
        else:
            tl.store(page_ptrs, tl.load(arena_ptrs, mask=mask), mask=mask)


def launch(paged, slots: torch.Tensor, arena: torch.Tensor, offsets: torch.Tensor, *,
           chunk_size: int, pack: bool) -> None:
    """One launch of :func:`paged_copy_kernel` for all layers, K/V and chunks (validated inputs)."""
    check_compiled_or_interpreted(paged_copy_kernel, arena)
    m = launch_meta(paged, arena, offsets, slots, chunk_size)
    paged_copy_kernel[m["grid"]](
        m["table"], m["slots"], m["offsets"], m["arena"],
        m["num_tokens"], m["block_size"], m["chunk_size"],
        m["stride_block"], m["stride_token"], m["stride_head"], m["row_words"], m["head_words"],
        WORD=m["WORD"], BLOCK_T=m["BLOCK_T"], BLOCK_R=m["BLOCK_R"], PACK=pack)


def ref_rows(paged, slots: torch.Tensor, offsets: torch.Tensor, chunk_size: int):
    """The references' walk: ``(page row view [H, D], arena byte offset)`` for every valid token,
    layer and K/V, in chunk order -- the chunk format spelled out one row at a time."""
    row = paged.row_bytes
    for c, off in enumerate(offsets.tolist()):
        for i in range(chunk_size):
            slot = int(slots[c * chunk_size + i])
            if slot < 0:
                continue
            block, pos = divmod(slot, paged.block_size)
            for layer in range(paged.num_layers):
                for kv in range(paged.num_kv):
                    start = off + ((layer * paged.num_kv + kv) * chunk_size + i) * row
                    yield paged.views[layer][kv][block, pos], start


def check_compiled_or_interpreted(kernel, arena: torch.Tensor) -> None:
    """CPU tensors work only with the interpreter, chosen when this package was first imported."""
    if arena.device.type != "cuda" and not isinstance(kernel, InterpretedFunction):
        raise ValueError(f"the Triton kernels were compiled for a GPU but the tensors are on "
                         f"{arena.device}: set TRITON_INTERPRET=1 before gpukv_kernels is imported, "
                         f"or use backend 'torch'")


def launch_meta(paged, arena: torch.Tensor, offsets: torch.Tensor, slots: torch.Tensor,
                chunk_size: int) -> dict:
    """Kernel arguments in words for validated inputs (see :func:`gpukv.paged.copy.validate`).

    A tile is ``BLOCK_T`` tokens x ``BLOCK_R`` words of a row (at most 4096 words), so short rows
    (one head of a TP8 shard) still give each program several KiB to move.
    """
    word = word_bytes(paged.word_bytes, arena.data_ptr())
    torch_word, tl_word = _WORDS[word]
    usable = arena.numel() - arena.numel() % word
    row_words = paged.row_bytes // word
    block_r = min(triton.next_power_of_2(row_words), MAX_TILE // 16)
    block_t = min(MAX_TILE // block_r, triton.next_power_of_2(slots.numel()))
    return dict(
        table=paged.addr_table,
        slots=slots,
        offsets=(offsets // word).to(arena.device),
        arena=arena[:usable].view(torch_word),
        num_tokens=slots.numel(),
        block_size=paged.block_size,
        chunk_size=chunk_size,
        stride_block=paged.stride_block_bytes // word,
        stride_token=paged.stride_token_bytes // word,
        stride_head=paged.stride_head_bytes // word,
        row_words=row_words,
        head_words=paged.head_bytes // word,
        WORD=tl_word,
        BLOCK_T=block_t,
        BLOCK_R=block_r,
        grid=(triton.cdiv(slots.numel(), block_t), paged.num_layers * paged.num_kv),
    )
