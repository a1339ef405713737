"""paged_copy: token rows between paged KV planes and contiguous chunks (pack and unpack).

This package knows nothing of gpukv's descriptors: every argument is raw. A *plane* is one
(layer, K/V) of the cache, numbered ``layer * num_kv + kv``; a chunk is ``chunk_size`` tokens of
every plane, ``[num_planes, chunk_size, num_heads * head_bytes]`` bytes (= gpukv's
``[num_layers, num_kv, chunk_size, row_bytes]``). Arguments:

  table    int64 ``[num_planes]`` on the device: byte address of each plane's block 0, token 0,
           head 0 (the planes may live in separate tensors: one launch covers all of them)
  slots    int64 ``[num_chunks * chunk_size]`` on the device: ``slot = block * block_size + pos``;
           ``-1`` skips the token (its chunk row, or its page row, is left alone)
  offsets  int64 ``[num_chunks]`` (CPU or the device): byte offset of each chunk in ``arena``
  arena    uint8 ``[N]``, contiguous, on the device
  ints     sizes, then byte strides of block, token-in-block and head; ``word_bytes`` (8/4/2/1)
           divides head_bytes, the strides, every table address, the arena's address and every
           offset: rows move as integer words, so bf16, fp16, fp8 and opaque records are one path
  layer_start, layer_stop   only planes ``layer_start * num_kv .. layer_stop * num_kv`` move;
           the other layers' bytes in the chunks and the pages are untouched

A program copies ``BLOCK_T`` tokens x one plane; each plane's base address is loaded from the
table and cast to a pointer. ``paged_copy`` checks ranks, dtypes, devices, sizes and alignment,
then launches once; slot and offset *values* (in range, chunks inside the arena, no overlap) are
the caller's precondition (gpukv checks them in ``gpukv.paged.copy.validate``).
``paged_copy_ref`` takes the same arguments and does the same in plain torch.
"""

from __future__ import annotations

import ctypes

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

MAX_TILE = 4096  # words one program moves per step

_WORDS = {8: (torch.int64, tl.int64), 4: (torch.int32, tl.int32), 2: (torch.int16, tl.int16),
          1: (torch.uint8, tl.uint8)}


@triton.jit
def _token_tile(slot_ptr, offs_ptr, pid_t, num_tokens, block_size, chunk_size,
                stride_block, stride_token, plane, row_words, BLOCK_T: tl.constexpr):
    """Word offsets of the tile's tokens in the pages and the arena, and the mask of valid ones."""
    t = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_range = t < num_tokens
    slot = tl.load(slot_ptr + t, mask=in_range, other=-1).to(tl.int64)
    valid = in_range & (slot >= 0)
    slot = tl.where(valid, slot, 0)
    page_off = (slot // block_size) * stride_block + (slot % block_size) * stride_token
    chunk_off = tl.load(offs_ptr + t // chunk_size, mask=in_range, other=0)
    arena_off = chunk_off + (plane.to(tl.int64) * chunk_size + t % chunk_size) * row_words
    return page_off, arena_off, valid


@triton.jit
def _row_cols(r0, row_words, head_words, stride_head, BLOCK_R: tl.constexpr):
    """Word offsets of row columns ``r0 .. r0 + BLOCK_R`` in the pages (head-strided) and the chunk."""
    r = r0 + tl.arange(0, BLOCK_R)
    r_mask = r < row_words
    page_col = (r // head_words).to(tl.int64) * stride_head + r % head_words
    return page_col, r.to(tl.int64), r_mask


@triton.jit
def paged_copy_kernel(table_ptr, slot_ptr, offs_ptr, arena_ptr,
                      num_tokens, block_size, chunk_size, plane_start, row_words, head_words,
                      stride_block, stride_token, stride_head,
                      WORD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
                      PACK: tl.constexpr):
    """One tile: ``BLOCK_T`` tokens of plane ``plane_start + program_id(1)``; PACK copies pages ->
    arena, else arena -> pages. Sizes, strides and offsets are in words."""
    pid_t = tl.program_id(0)
    plane = plane_start + tl.program_id(1)
    base = tl.load(table_ptr + plane).to(tl.pointer_type(WORD))
    page_off, arena_off, valid = _token_tile(slot_ptr, offs_ptr, pid_t, num_tokens, block_size,
                                             chunk_size, stride_block, stride_token, plane,
                                             row_words, BLOCK_T)
    for r0 in range(0, row_words, BLOCK_R):
        page_col, chunk_col, r_mask = _row_cols(r0, row_words, head_words, stride_head, BLOCK_R)
        mask = valid[:, None] & r_mask[None, :]
        page_ptrs = base + page_off[:, None] + page_col[None, :]
        arena_ptrs = arena_ptr + arena_off[:, None] + chunk_col[None, :]
        if PACK:
            tl.store(arena_ptrs, tl.load(page_ptrs, mask=mask), mask=mask)
        else:
            tl.store(page_ptrs, tl.load(arena_ptrs, mask=mask), mask=mask)


def paged_copy(table: torch.Tensor, slots: torch.Tensor, offsets: torch.Tensor, arena: torch.Tensor,
               *, num_blocks: int, block_size: int, chunk_size: int, num_kv: int, num_heads: int,
               head_bytes: int, stride_block: int, stride_token: int, stride_head: int,
               layer_start: int, layer_stop: int, word_bytes: int, pack: bool) -> None:
    """Copy ``len(offsets)`` chunks between the planes in ``table`` and ``arena`` in one launch
    (``pack``: pages -> arena, else arena -> pages). Arguments as in the module docstring."""
    _check(table, slots, offsets, arena, num_blocks=num_blocks, block_size=block_size,
           chunk_size=chunk_size, num_kv=num_kv, num_heads=num_heads, head_bytes=head_bytes,
           stride_block=stride_block, stride_token=stride_token, stride_head=stride_head,
           layer_start=layer_start, layer_stop=layer_stop, word_bytes=word_bytes)
    if arena.device.type != "cuda" and not isinstance(paged_copy_kernel, InterpretedFunction):
        raise ValueError(f"the Triton kernels were compiled for a GPU but the tensors are on "
                         f"{arena.device}: set TRITON_INTERPRET=1 before gpukv_kernels is imported")
    if slots.numel() == 0:
        return
    w = word_bytes
    torch_word, tl_word = _WORDS[w]
    row_words = num_heads * head_bytes // w
    block_r = min(triton.next_power_of_2(row_words), MAX_TILE // 16)
    block_t = min(MAX_TILE // block_r, triton.next_power_of_2(slots.numel()))
    usable = arena.numel() - arena.numel() % w
    grid = (triton.cdiv(slots.numel(), block_t), (layer_stop - layer_start) * num_kv)
    paged_copy_kernel[grid](
        table, slots, (offsets // w).to(arena.device), arena[:usable].view(torch_word),
        slots.numel(), block_size, chunk_size, layer_start * num_kv, row_words, head_bytes // w,
        stride_block // w, stride_token // w, stride_head // w,
        WORD=tl_word, BLOCK_T=block_t, BLOCK_R=block_r, PACK=pack)


def paged_copy_ref(table: torch.Tensor, slots: torch.Tensor, offsets: torch.Tensor, arena: torch.Tensor,
                   *, num_blocks: int, block_size: int, chunk_size: int, num_kv: int, num_heads: int,
                   head_bytes: int, stride_block: int, stride_token: int, stride_head: int,
                   layer_start: int, layer_stop: int, word_bytes: int, pack: bool) -> None:
    """:func:`paged_copy` in plain torch: per plane, a strided byte view of the memory at its table
    address (``torch.frombuffer`` on CPU, ``__cuda_array_interface__`` on CUDA) and one indexed
    copy of the valid rows per chunk. Slow and obviously right; the tests' reference backend."""
    _check(table, slots, offsets, arena, num_blocks=num_blocks, block_size=block_size,
           chunk_size=chunk_size, num_kv=num_kv, num_heads=num_heads, head_bytes=head_bytes,
           stride_block=stride_block, stride_token=stride_token, stride_head=stride_head,
           layer_start=layer_start, layer_stop=layer_stop, word_bytes=word_bytes)
    row = num_heads * head_bytes
    span = ((num_blocks - 1) * stride_block + (block_size - 1) * stride_token
            + (num_heads - 1) * stride_head + head_bytes)
    addresses = table.tolist()
    block, pos = slots // block_size, slots % block_size
    for plane in range(layer_start * num_kv, layer_stop * num_kv):
        pages = torch.as_strided(_memory_at(addresses[plane], span, arena.device),
                                 (num_blocks, block_size, num_heads, head_bytes),
                                 (stride_block, stride_token, stride_head, 1))
        for c, off in enumerate(offsets.tolist()):
            tokens = slice(c * chunk_size, (c + 1) * chunk_size)
            valid = slots[tokens] >= 0
            b, p = block[tokens][valid], pos[tokens][valid]
            start = off + plane * chunk_size * row
            rows = arena[start:start + chunk_size * row].view(chunk_size, num_heads, head_bytes)
            if pack:
                rows[valid] = pages[b, p]
            else:
                pages[b, p] = rows[valid]


class _CudaMemory:
    """``nbytes`` of device memory at ``address``, for ``torch.as_tensor`` (no copy)."""

    def __init__(self, address: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "strides": None,
                                         "data": (address, False), "version": 3}


def _memory_at(address: int, nbytes: int, device: torch.device) -> torch.Tensor:
    """A uint8 tensor over ``nbytes`` at ``address`` on ``device`` (the caller keeps it alive)."""
    if device.type == "cuda":
        return torch.as_tensor(_CudaMemory(address, nbytes), device=device)
    if device.type == "cpu":
        return torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(address), dtype=torch.uint8)
    raise ValueError(f"paged_copy_ref runs on cpu or cuda tensors, got {device}")


def _check(table, slots, offsets, arena, *, num_blocks, block_size, chunk_size, num_kv, num_heads,
           head_bytes, stride_block, stride_token, stride_head, layer_start, layer_stop,
           word_bytes) -> None:
    """Ranks, dtypes, devices, sizes and alignment of :func:`paged_copy`'s arguments."""
    for name, t, dtype in (("table", table, torch.int64), ("slots", slots, torch.int64),
                           ("offsets", offsets, torch.int64), ("arena", arena, torch.uint8)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype != dtype:
            got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 1-D {dtype} tensor, got {got}")
    device = arena.device
    for name, t in (("table", table), ("slots", slots)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, arena on {device}")
    if offsets.device.type not in ("cpu", device.type):
        raise ValueError(f"offsets is on {offsets.device}, arena on {device}")
    if not arena.is_contiguous() or not slots.is_contiguous() or not table.is_contiguous():
        raise ValueError(f"arena, slots and table must be contiguous, got strides {arena.stride()}, "
                         f"{slots.stride()}, {table.stride()}")
    ints = dict(num_blocks=num_blocks, block_size=block_size, chunk_size=chunk_size, num_kv=num_kv,
                num_heads=num_heads, head_bytes=head_bytes, stride_block=stride_block,
                stride_token=stride_token, stride_head=stride_head, layer_start=layer_start,
                layer_stop=layer_stop, word_bytes=word_bytes)
    for name, v in ints.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    for name in ("num_blocks", "block_size", "chunk_size", "num_kv", "num_heads", "head_bytes"):
        if ints[name] == 0:
            raise ValueError(f"{name} must be positive, got 0")
    if table.numel() % num_kv:
        raise ValueError(f"table has {table.numel()} planes, not a multiple of num_kv={num_kv}")
    if not 0 <= layer_start < layer_stop <= table.numel() // num_kv:
        raise ValueError(f"layers [{layer_start}, {layer_stop}) are not a non-empty range of the "
                         f"{table.numel() // num_kv} layers in table")
    if slots.numel() != offsets.numel() * chunk_size:
        raise ValueError(f"slots has {slots.numel()} entries, expected len(offsets) * chunk_size = "
                         f"{offsets.numel()} * {chunk_size}")
    if word_bytes not in _WORDS:
        raise ValueError(f"word_bytes must be 1, 2, 4 or 8, got {word_bytes}")
    for name in ("head_bytes", "stride_block", "stride_token", "stride_head"):
        if ints[name] % word_bytes:
            raise ValueError(f"{name}={ints[name]} is not a multiple of word_bytes={word_bytes}")
    if arena.data_ptr() % word_bytes:
        raise ValueError(f"arena address {arena.data_ptr():#x} is not a multiple of word_bytes={word_bytes}")
