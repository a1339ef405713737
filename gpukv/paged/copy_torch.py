"""The fast CPU path of pack/unpack: unit gathers straight into / out of the arena.

Every layout is moved in *units* (:mod:`gpukv.paged.units`), the largest piece of a token row
that is contiguous in the pages: a chunk moves with one gather (pack) or scatter (unpack) per
plane group, straight between the pages and the arena, no temporary. Where a block's rows are
contiguous (NHD, MLA) and a chunk's slots are whole blocks in order (what a vLLM block table
gives), the chunk moves in whole blocks instead: one memmove per block.

On CPU the copies run through numpy views of the same memory (zero-copy) whose items are whole
units or blocks (opaque ``void`` items, :mod:`gpukv.paged.groups`), moved by a compiled gather /
scatter that prefetches the items ahead (:mod:`gpukv.paged.native`; numpy's ``take(out=)`` /
``put``, one memmove per item, where it cannot be built), and planes sharing a buffer (K and V of
a layer, all layers of a vLLM cross-layer buffer) move in one call. Both release the GIL while copying,
so a large call splits its work over ``torch.get_num_threads()`` threads: the caller's and a pool
kept with the cache (:meth:`PagedKV.cached`), which take pieces in turn (:func:`run_shared`).
On other devices (``backend="torch"`` forced on CUDA) a plain loop over chunks and planes does
indexed copies on integer-word views (:func:`gpukv.paged.units.unit_plan`).
Arguments are validated by :mod:`gpukv.paged.copy`; this module assumes them correct.
"""

from __future__ import annotations

import functools
import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np
import torch

from gpukv.paged.groups import GroupPlan, group_plan
from gpukv.paged.layout import INT_BY_SIZE, PagedKV, word_bytes
from gpukv.paged.native import native_copy
from gpukv.paged.units import like, unit_index, unit_plan, void_items

# a CPU call uses one more thread per 8 MiB it moves, up to torch's thread count, and cuts its
# work into a few pieces per thread that the threads take in turn
BYTES_PER_THREAD = 8 << 20
PIECES_PER_THREAD = 4


def pack_torch(paged: PagedKV, slots: torch.Tensor, arena: torch.Tensor, offsets: torch.Tensor, *,
               chunk_size: int, layers: tuple[int, int] | None = None) -> None:
    """Pages -> arena. ``slots`` int64 on the cache's device; ``offsets`` CPU int64; ``layers`` a
    validated ``(start, stop)`` or None for all (see :func:`gpukv.paged.copy.pack`)."""
    copy = _copy_host if arena.device.type == "cpu" else _copy_device
    copy(paged, slots, arena, offsets, chunk_size, layers or (0, paged.num_layers), to_arena=True)


def unpack_torch(paged: PagedKV, slots: torch.Tensor, arena: torch.Tensor, offsets: torch.Tensor, *,
                 chunk_size: int, layers: tuple[int, int] | None = None) -> None:
    """Arena -> pages; the arguments mean what they do in :func:`pack_torch`."""
    copy = _copy_host if arena.device.type == "cpu" else _copy_device
    copy(paged, slots, arena, offsets, chunk_size, layers or (0, paged.num_layers), to_arena=False)


def _copy_host(paged: PagedKV, slots: torch.Tensor, arena: torch.Tensor, offsets: torch.Tensor,
               chunk_size: int, layers: tuple[int, int], *, to_arena: bool) -> None:
    lo, hi = layers[0] * paged.num_kv, layers[1] * paged.num_kv
    slots = slots.view(-1, chunk_size).numpy()  # index math on a few thousand ints: numpy
    valid = slots >= 0
    full = valid.all(1)
    blocks = group_plan(paged, "blocks")
    blocked = _whole_blocks(paged.block_size, slots) & full if blocks is not None else np.zeros_like(full)
    units = group_plan(paged, "units")
    per_row = unit_plan(paged).units_per_row
    local = {}  # per plan: [chunks, items per plane] item indices inside one plane
    if blocked.any():
        local["blocks"] = slots[:, ::paged.block_size] // paged.block_size * blocks.block_step
    if not blocked.all():
        local["units"] = unit_index(paged, unit_plan(paged), slots * valid)
    memory, layer_bytes, base = arena.numpy(), paged.layer_bytes(chunk_size), arena.data_ptr()
    start, span = layers[0] * layer_bytes, (layers[1] - layers[0]) * layer_bytes
    # (group items, its rows of the chunk, item index, kept rows or None, the items' and the
    # rows' addresses)
    work = []
    index_cache: dict = {}
    addresses: dict = {}  # id(group items) -> address
    for c, off in enumerate(offsets.tolist()):
        kind = "blocks" if blocked[c] else "units"
        plan: GroupPlan = blocks if blocked[c] else units
        chunk = void_items(memory[off + start:off + start + span], plan.item_bytes)
        per_plane = len(chunk) // (hi - lo)
        keep = None if full[c] else valid[c].repeat(per_row).nonzero()[0]
        for g in plan.in_range(lo, hi):
            rows = chunk[(g.first - lo) * per_plane:(g.stop - lo) * per_plane]
            rows_addr = base + off + start + (g.first - lo) * per_plane * plan.item_bytes
            items_addr = addresses.get(id(g.items))
            if items_addr is None:
                items_addr = addresses[id(g.items)] = g.items.ctypes.data
            key = (kind, c, g.plane_offsets)
            idx = index_cache.get(key)
            if idx is None:
                idx = index_cache[key] = (np.asarray(g.plane_offsets)[:, None] + local[kind][c]).reshape(-1)
            if keep is None:
                work.append((g.items, rows, idx, None, items_addr, rows_addr))
            else:
                kept = (np.arange(g.stop - g.first)[:, None] * per_plane + keep).reshape(-1)
                work.append((g.items, rows, idx[kept], kept, items_addr, rows_addr))
    threads = min(torch.get_num_threads(), len(work), len(offsets) * span // BYTES_PER_THREAD)
    if threads <= 1:
        _move_host(work, to_arena)
        return
    # numpy releases the GIL while it copies: the work splits over this thread and the pool's
    num_pieces = min(len(work), PIECES_PER_THREAD * threads)
    cuts = [len(work) * k // num_pieces for k in range(num_pieces + 1)]
    # one pool per process: a forked child must not wait on its parent's threads
    pool = paged.cached(("copy_pool", threads, os.getpid()), lambda: ThreadPoolExecutor(
        threads - 1, thread_name_prefix="gpukv-copy"))
    run_shared([functools.partial(_move_host, work[a:b], to_arena) for a, b in zip(cuts, cuts[1:])],
               pool, threads)


def run_shared(pieces: Sequence[Callable[[], object]], pool: ThreadPoolExecutor, threads: int) -> None:
    """Run ``pieces`` on the calling thread and ``threads - 1`` of ``pool``'s, each thread taking
    the next piece when it finishes one: a thread whose core another process took delays the call
    by one piece at most, not by its whole share, and a busy pool delays it not at all (the
    caller takes every piece left)."""
    counter = itertools.count()  # next() on it is atomic under the GIL

    def drain() -> None:
        for i in counter:
            if i >= len(pieces):
                return
            pieces[i]()

    futures = [pool.submit(drain) for _ in range(threads - 1)]
    drain()
    for future in futures:  # all pieces are taken: a helper that never started is not waited for
        if not future.cancel():
            future.result()


def _move_host(work: list, to_arena: bool) -> None:
    """One gather (pack) or scatter (unpack) of items per entry: all in one call of the compiled
    loop, with prefetch, where :func:`gpukv.paged.native.native_copy` is built (one call per item
    size), else numpy's take / put per entry."""
    native = native_copy()
    batched: dict[int, list] = {}  # item bytes -> entries for the compiled loop
    for items, rows, idx, kept, items_addr, rows_addr in work:
        if kept is not None:  # a chunk with -1 slots: only its kept rows
            if to_arena:
                rows[kept] = items[idx]
            else:
                items[idx] = rows[kept]
        elif native is not None:
            batched.setdefault(items.itemsize, []).append((items_addr, len(items), rows_addr, idx))
        elif to_arena:
            items.take(idx, 0, rows, "clip")  # mode "raise" would buffer `out`
        else:
            items.put(idx, rows, "clip")
    for item, entries in batched.items():
        native.run(native.batch(entries, item), to_rows=to_arena)


def _copy_device(paged: PagedKV, slots: torch.Tensor, arena: torch.Tensor, offsets: torch.Tensor,
                 chunk_size: int, layers: tuple[int, int], *, to_arena: bool) -> None:
    """The same copy with torch ops on any device: a loop over planes and chunks."""
    plan = unit_plan(paged, word_bytes(paged.word_bytes, arena.data_ptr()))
    lo, hi = layers[0] * paged.num_kv, layers[1] * paged.num_kv
    slots = slots.view(-1, chunk_size)
    valid = slots >= 0
    index = unit_index(paged, plan, slots * valid)  # [chunks, units]
    words = plan.unit_bytes // plan.word_bytes
    layer_bytes = paged.layer_bytes(chunk_size)
    start, span = layers[0] * layer_bytes, (layers[1] - layers[0]) * layer_bytes
    for c, off in enumerate(offsets.tolist()):
        chunk = arena[off + start:off + start + span].view(INT_BY_SIZE[plan.word_bytes])
        chunk = chunk.view(hi - lo, -1, words)
        keep = valid[c].repeat_interleave(plan.units_per_row).nonzero().flatten()
        idx = index[c][keep]
        for i, plane in enumerate(plan.planes[lo:hi]):
            if to_arena:
                chunk[i][keep] = plane[idx]
            else:
                plane[idx] = chunk[i][keep]


def _whole_blocks(block_size: int, slots: np.ndarray) -> np.ndarray:
    """Per chunk: are its slots whole blocks, each in order?"""
    num_chunks = slots.shape[0]
    if block_size == 1 or slots.shape[1] % block_size:
        return np.zeros(num_chunks, dtype=bool)
    grid = slots.reshape(num_chunks, -1, block_size)
    whole = ((grid - grid[..., :1]) == like(range(block_size), slots)).all(-1) & (grid[..., 0] % block_size == 0)
    return whole.all(-1)
