"""paged_copy: token rows between paged KV planes and contiguous chunks (pack and unpack).

This package knows nothing of gpukv's descriptors: every argument is raw. A *plane* is one
(layer, K/V) of the cache, numbered ``layer * num_kv + kv``; a chunk is ``chunk_size`` tokens of
every plane, ``[num_planes, chunk_size, num_heads * head_bytes]`` bytes (= gpukv's
``[num_layers, num_kv, chunk_size, row_bytes]``). Arguments:

  table    int64 ``[num_planes]`` on the device: byte address of each plane's block 0, token 0,
           head 0 (the planes may live in separate tensors: one launch covers all of them)
  slots    int64 ``[num_chunks * chunk_size]`` on the device: ``slot = block * block_size + pos``;
           ``-1`` skips the token (its chunk row, or its page row, is left alone)
  offsets  int64 ``[num_chunks]`` on the device: byte offset of each chunk in ``arena``
  arena    uint8 ``[N]``, contiguous, on the device
  ints     sizes, then byte strides of block, token-in-block and head; ``word_bytes`` (16, 8,
           4, 2 or 1) divides head_bytes, the strides, every table address, the arena's address
           and every offset: rows move as 16-byte vectors (16) or integer words, so bf16, fp16,
           fp8 and opaque records (656 B fp8_ds_mla) are one path
  layer_start, layer_stop   only planes ``layer_start * num_kv .. layer_stop * num_kv`` move;
           the other layers' bytes in the chunks and the pages are untouched
  sm_budget  CTAs of 1024 threads (at most that many SMs busy); None = every SM. Default:
           ``paged_copy_plan.DEFAULT_SM_BUDGET`` (why: see that module)

``paged_copy`` checks ranks, dtypes, devices, sizes and the alignment it can see, then launches
once on the current stream of the arena's device, without synchronizing the host (no value of a
device tensor is read). Slot, offset and table *values* (in range, aligned to ``word_bytes``,
chunks inside the arena, no overlap) are the caller's precondition (gpukv checks them in
``gpukv.paged.copy.validate``). ``paged_copy_ref`` takes the same arguments and does the same in
plain torch. The launch parameters come from :func:`gpukv_kernels.paged_copy_plan.plan_copy`.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from gpukv_kernels.paged_copy_plan import (DEFAULT_SM_BUDGET, DIV32, WORD_SIZES, CopyPlan,
                                           check_budget, plan_copy)

_WORDS = {8: (torch.int64, tl.int64), 4: (torch.int32, tl.int32), 2: (torch.int16, tl.int16),
          1: (torch.uint8, tl.uint8)}
_DIV32 = tl.constexpr(DIV32)  # a global a kernel reads must be a constexpr


@triton.jit(do_not_specialize=["num_items", "num_planes", "plane_start"])
def paged_copy_kernel(table_ptr, slot_ptr, offs_ptr, arena_ptr,
                      num_items, items_per_segment, num_planes, plane_start, chunk_size, block_size,
                      stride_block, stride_token, stride_head,
                      WORD: tl.constexpr, VEC: tl.constexpr, ROW_UNITS: tl.constexpr,
                      HEAD_UNITS: tl.constexpr, STEP: tl.constexpr, SLOT_DIV: tl.constexpr,
                      PACK: tl.constexpr):
    """Grid-stride loop over items (``STEP`` units of one plane of one chunk); PACK copies pages
    -> arena, else arena -> pages. A unit is ``VEC`` words of type ``WORD`` (16 bytes on the
    vector path); sizes and strides are in units.

    Thread ``i`` of the CTA moves units ``i, i + threads, ...`` of the item: consecutive lanes
    touch consecutive units of the arena, and of a row in the pages, and a thread issues all its
    loads before its stores (the compiler may not move a load above a store that could alias
    it, so one wide ``tl.load`` is what keeps several loads in flight). Index work: two 32-bit
    divisions per item, a division by the constexpr ``ROW_UNITS`` (a multiply) per unit, the
    slot's block and position by shift and mask (``SLOT_DIV >= 0``), 64-bit only for the page
    and arena offsets. The item's chunk offset is in bytes and becomes units by a shift."""
    UNIT_BYTES: tl.constexpr = VEC * WORD.primitive_bitwidth // 8
    lane = tl.arange(0, STEP)
    word = tl.arange(0, VEC)
    segment_units = chunk_size * ROW_UNITS
    for item in range(tl.program_id(0), num_items, tl.num_programs(0)):
        segment = item // items_per_segment
        chunk = segment // num_planes
        plane = plane_start + (segment - chunk * num_planes)
        u = (item - segment * items_per_segment) * STEP + lane  # unit in the segment
        in_segment = u < segment_units
        token = u // ROW_UNITS
        col = u - token * ROW_UNITS
        slot = tl.load(slot_ptr + chunk * chunk_size + token, mask=in_segment, other=-1)
        page = _page_units(slot, col, block_size, stride_block, stride_token, stride_head,
                           ROW_UNITS, HEAD_UNITS, SLOT_DIV)
        base = tl.load(table_ptr + plane).to(tl.pointer_type(WORD))
        base = tl.multiple_of(base, UNIT_BYTES)
        first = tl.load(offs_ptr + chunk) // UNIT_BYTES + plane.to(tl.int64) * segment_units
        page_ptrs = base + (page * VEC)[:, None] + word[None, :]
        arena_ptrs = arena_ptr + ((first + u) * VEC)[:, None] + word[None, :]
        mask = (slot >= 0)[:, None]
        if PACK:
            rows = tl.load(page_ptrs, mask=mask, eviction_policy="evict_first")
            tl.store(arena_ptrs, rows, mask=mask)
        else:
            rows = tl.load(arena_ptrs, mask=mask, eviction_policy="evict_first")
            tl.store(page_ptrs, rows, mask=mask)


@triton.jit
def _page_units(slot, col, block_size, stride_block, stride_token, stride_head,
                ROW_UNITS: tl.constexpr, HEAD_UNITS: tl.constexpr, SLOT_DIV: tl.constexpr):
    """Unit offset in its plane of column ``col`` of slot ``slot``'s row (int64; garbage where
    ``slot < 0``, which the caller masks)."""
    if SLOT_DIV >= 0:
        block = slot >> SLOT_DIV
        pos = slot & ((1 << SLOT_DIV) - 1)
    elif SLOT_DIV == _DIV32:
        narrow = slot.to(tl.int32)
        block = (narrow // block_size).to(tl.int64)
        pos = (narrow - (narrow // block_size) * block_size).to(tl.int64)
    else:
        block = slot // block_size
        pos = slot - block * block_size
    page = block * stride_block + pos * stride_token
    if HEAD_UNITS == ROW_UNITS:
        return page + col
    head = col // HEAD_UNITS
    return page + head.to(tl.int64) * stride_head + (col - head * HEAD_UNITS)


class Launch(NamedTuple):
    """One launch of :func:`paged_copy_kernel`: ``kernel[grid](*args, **kwargs)``."""

    grid: tuple[int]
    args: tuple
    kwargs: dict
    plan: CopyPlan


def kernel_launch(table: torch.Tensor, slots: torch.Tensor, offsets: torch.Tensor,
                  arena: torch.Tensor, *, pack: bool, sm_budget: int | None, sm_count: int | None,
                  **ints) -> Launch:
    """The launch :func:`paged_copy` makes for checked arguments (also what the SASS test
    compiles, with ``sm_count`` given instead of read from a device)."""
    plan = plan_copy(num_tokens=slots.numel(), sm_budget=sm_budget, sm_count=sm_count, **ints)
    torch_word, tl_word = _WORDS[plan.word_bytes]
    usable = arena.numel() - arena.numel() % plan.word_bytes
    args = (table, slots, offsets, arena[:usable].view(torch_word),
            plan.num_items, plan.items_per_segment, plan.num_planes, plan.plane_start,
            ints["chunk_size"], ints["block_size"], plan.stride_block, plan.stride_token,
            plan.stride_head)
    kwargs = dict(plan.constexprs(pack), WORD=tl_word, num_warps=plan.num_warps)
    return Launch((plan.grid,), args, kwargs, plan)


def paged_copy(table: torch.Tensor, slots: torch.Tensor, offsets: torch.Tensor, arena: torch.Tensor,
               *, num_blocks: int, block_size: int, chunk_size: int, num_kv: int, num_heads: int,
               head_bytes: int, stride_block: int, stride_token: int, stride_head: int,
               layer_start: int, layer_stop: int, word_bytes: int, pack: bool,
               sm_budget: int | None = DEFAULT_SM_BUDGET) -> None:
    """Copy ``len(offsets)`` chunks between the planes in ``table`` and ``arena`` in one launch
    (``pack``: pages -> arena, else arena -> pages). Arguments as in the module docstring."""
    ints = dict(num_blocks=num_blocks, block_size=block_size, chunk_size=chunk_size,
                num_kv=num_kv, num_heads=num_heads, head_bytes=head_bytes,
                stride_block=stride_block, stride_token=stride_token, stride_head=stride_head,
                layer_start=layer_start, layer_stop=layer_stop, word_bytes=word_bytes)
    _check(table, slots, offsets, arena, **ints)
    check_budget(sm_budget)
    cuda = arena.device.type == "cuda"
    if not cuda and not isinstance(paged_copy_kernel, InterpretedFunction):
        raise ValueError(f"the Triton kernels were compiled for a GPU but the tensors are on "
                         f"{arena.device}: set TRITON_INTERPRET=1 before gpukv_kernels is imported")
    if slots.numel() == 0:
        return
    launch = kernel_launch(table, slots, offsets, arena, pack=pack, sm_budget=sm_budget,
                           sm_count=_sm_count(arena.device) if cuda else None, **ints)
    with torch.cuda.device(arena.device) if cuda else contextlib.nullcontext():
        paged_copy_kernel[launch.grid](*launch.args, **launch.kwargs)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def paged_copy_ref(table: torch.Tensor, slots: torch.Tensor, offsets: torch.Tensor, arena: torch.Tensor,
                   *, num_blocks: int, block_size: int, chunk_size: int, num_kv: int, num_heads: int,
                   head_bytes: int, stride_block: int, stride_token: int, stride_head: int,
                   layer_start: int, layer_stop: int, word_bytes: int, pack: bool,
                   sm_budget: int | None = DEFAULT_SM_BUDGET) -> None:
    """:func:`paged_copy` in plain torch: per plane, a strided byte view of the memory at its table
    address (``torch.frombuffer`` on CPU, ``__cuda_array_interface__`` on CUDA) and one indexed
    copy of the valid rows per chunk. Slow and obviously right (it reads the table and offsets
    back to the host); the tests' reference backend. ``sm_budget`` is checked, then unused."""
    _check(table, slots, offsets, arena, num_blocks=num_blocks, block_size=block_size,
           chunk_size=chunk_size, num_kv=num_kv, num_heads=num_heads, head_bytes=head_bytes,
           stride_block=stride_block, stride_token=stride_token, stride_head=stride_head,
           layer_start=layer_start, layer_stop=layer_stop, word_bytes=word_bytes)
    check_budget(sm_budget)
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
    """Ranks, dtypes, devices, sizes and alignment of :func:`paged_copy`'s arguments (host
    metadata only: no device value is read)."""
    for name, t, dtype in (("table", table, torch.int64), ("slots", slots, torch.int64),
                           ("offsets", offsets, torch.int64), ("arena", arena, torch.uint8)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype != dtype:
            got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 1-D {dtype} tensor, got {got}")
    device = arena.device
    for name, t in (("table", table), ("slots", slots), ("offsets", offsets)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, arena on {device}: the launcher reads no "
                             f"host data (stage it on the device, e.g. pinned + non_blocking)")
    for name, t in (("arena", arena), ("slots", slots), ("offsets", offsets), ("table", table)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got stride {t.stride()}")
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
    if word_bytes not in WORD_SIZES:
        raise ValueError(f"word_bytes must be 16, 8, 4, 2 or 1, got {word_bytes}")
    for name in ("head_bytes", "stride_block", "stride_token", "stride_head"):
        if ints[name] % word_bytes:
            raise ValueError(f"{name}={ints[name]} is not a multiple of word_bytes={word_bytes}")
    if arena.data_ptr() % word_bytes:
        raise ValueError(f"arena address {arena.data_ptr():#x} is not a multiple of word_bytes={word_bytes}")
