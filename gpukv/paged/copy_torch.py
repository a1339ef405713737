"""The fast CPU path of pack/unpack: unit gathers straight into / out of the arena.

Every layout is moved in *units* (:mod:`gpukv.paged.units`), the largest piece of a token row
that is contiguous in the pages: a chunk moves with one gather (pack) or scatter (unpack) per
plane group, straight between the pages and the arena, no temporary. Where a block's rows are
contiguous (NHD, MLA) and a chunk's slots are whole blocks in order (what a vLLM block table
gives), the chunk moves in whole blocks instead: one memmove per block.

On CPU the copies run through numpy views of the same memory (zero-copy) whose items are whole
units or blocks (opaque ``void`` items, :mod:`gpukv.paged.groups`), moved by a compiled gather /
scatter that prefetches the items ahead and writes the arena with streaming stores (the pages
too in large unpacks: :func:`nontemporal`; :mod:`gpukv.paged.native`), or by
numpy's ``take(out=)`` / ``put``, one memmove per item, where it cannot be built. Planes sharing
a buffer (K and V of a layer, all layers of a vLLM cross-layer buffer) move in one call. Both
release the GIL while copying, so a large call splits its work over ``torch.get_num_threads()``
threads, no more than the calling thread may run on (a vLLM worker's copy thread runs where
:mod:`gpukv.integrations.vllm.thread_cpus` places it): the caller's and a pool
kept with the cache (:meth:`PagedKV.cached`), which take pieces in turn (:func:`run_shared`).
On other devices (``backend="torch"`` forced on CUDA) a plain loop over chunks and planes does
indexed copies on integer-word views (:func:`gpukv.paged.units.unit_views`).
Arguments are validated by :mod:`gpukv.paged.copy`; this module assumes them correct.
"""

from __future__ import annotations

import functools
import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

from gpukv.paged.groups import PlaneGroups, plane_groups
from gpukv.paged.layout import INT_BY_SIZE, PagedKV, word_bytes
from gpukv.paged.native import Batch, native_copy
from gpukv.paged.units import like, unit_index, unit_views, void_items

# a CPU call uses one more thread per 8 MiB it moves, up to torch's thread count, and cuts its
# work into a few pieces per thread that the threads take in turn
BYTES_PER_THREAD = 8 << 20
PIECES_PER_THREAD = 4
# an unpack of at least this many bytes writes the pages with streaming stores (see nontemporal())
STREAM_UNPACK_BYTES = 16 << 20


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
    blocks = plane_groups(paged, "blocks")
    blocked = _whole_blocks(paged.block_size, slots) & full if blocks is not None else np.zeros_like(full)
    units = plane_groups(paged, "units")
    per_row = unit_views(paged).units_per_row
    local = {}  # per item kind: [chunks, items per plane] item indices inside one plane
    if blocked.any():
        local["blocks"] = slots[:, ::paged.block_size] // paged.block_size * blocks.block_step
    if not blocked.all():
        local["units"] = unit_index(paged, unit_views(paged), slots * valid)
    memory, layer_bytes, base = arena.numpy(), paged.layer_bytes(chunk_size), arena.data_ptr()
    start, span = layers[0] * layer_bytes, (layers[1] - layers[0]) * layer_bytes
    native = native_copy()
    work = []  # numpy's: (group items, its rows of the chunk, item index, kept rows or None)
    batches: dict[int, _BatchParts] = {}  # the compiled loop's, per item size
    index_cache: dict = {}
    for c, off in enumerate(offsets.tolist()):
        kind = "blocks" if blocked[c] else "units"
        grouped: PlaneGroups = blocks if blocked[c] else units
        per_plane = span // grouped.item_bytes // (hi - lo)
        if native is not None and full[c]:  # one vectorised step for all of the chunk's groups
            parts = batches.get(grouped.item_bytes)
            if parts is None:
                parts = batches[grouped.item_bytes] = _BatchParts(grouped.item_bytes)
            parts.add(_native_layout(paged, grouped, kind, lo, hi, per_plane), local[kind][c],
                      base + off + start)
            continue
        chunk = void_items(memory[off + start:off + start + span], grouped.item_bytes)
        keep = None if full[c] else valid[c].repeat(per_row).nonzero()[0]
        for g in grouped.in_range(lo, hi):
            rows = chunk[(g.first - lo) * per_plane:(g.stop - lo) * per_plane]
            key = (kind, c, g.plane_offsets)
            idx = index_cache.get(key)
            if idx is None:
                idx = index_cache[key] = (np.asarray(g.plane_offsets)[:, None] + local[kind][c]).reshape(-1)
            if keep is None:
                work.append((g.items, rows, idx, None))
            else:
                kept = (np.arange(g.stop - g.first)[:, None] * per_plane + keep).reshape(-1)
                work.append((g.items, rows, idx[kept], kept))
    compiled = [parts.batch() for parts in batches.values()]
    entries = len(work) + sum(len(b.counts) for b in compiled)
    threads = min(torch.get_num_threads(), entries, len(offsets) * span // BYTES_PER_THREAD)
    if threads > 1:
        threads = min(threads, thread_cpus())
    streaming = nontemporal(to_arena, len(offsets) * span)
    if threads <= 1:
        for batch in compiled:
            native.run(batch, to_rows=to_arena, nontemporal=streaming)
        _move_host(work, to_arena)
        return
    # both movers release the GIL while they copy: the work splits over this thread and the pool's
    num_pieces = min(entries, PIECES_PER_THREAD * threads)
    pieces = [functools.partial(native.run, piece, to_rows=to_arena, nontemporal=streaming)
              for batch in compiled
              for piece in batch.split(max(1, num_pieces * len(batch.counts) // entries))]
    if work:
        share = max(1, num_pieces * len(work) // entries)
        cuts = [len(work) * k // share for k in range(share + 1)]
        pieces += [functools.partial(_move_host, work[a:b], to_arena) for a, b in zip(cuts, cuts[1:])]
    # one pool per process: a forked child must not wait on its parent's threads
    pool = paged.cached(("copy_pool", threads, os.getpid()), lambda: ThreadPoolExecutor(
        threads - 1, thread_name_prefix="gpukv-copy"))
    run_shared(pieces, pool, threads)


def thread_cpus() -> int:
    """How many CPUs the calling thread may run on (more copy threads than that gain nothing)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def nontemporal(to_arena: bool, call_bytes: int) -> bool:
    """Whether the compiled loop writes with streaming stores (:mod:`gpukv.paged.native`).

    Always into the arena: it is written once and read much later, so caching it only evicts
    the model's data. Into the pages only in a call of at least STREAM_UNPACK_BYTES: attention
    reads them next, and a smaller call's (a layer-wise unpack) may still be cached then
    (``perf/sweep_stream_readback.py`` times an unpack with the read that follows it)."""
    return to_arena or call_bytes >= STREAM_UNPACK_BYTES


class _NativeLayout(NamedTuple):
    """Plane groups over planes ``lo .. hi - 1`` as arrays for the compiled loop."""

    items_addr: np.ndarray  # [groups] int64
    num_items: np.ndarray
    rows_offset: np.ndarray  # bytes from the chunk's first row of these planes to the group's
    key_of: np.ndarray  # [groups]: which of ``plane_offsets`` the group's index uses
    plane_offsets: tuple[np.ndarray, ...]  # distinct [planes, 1] item offsets


def _native_layout(paged: PagedKV, grouped: PlaneGroups, kind: str, lo: int, hi: int,
                   per_plane: int) -> _NativeLayout:
    def build() -> _NativeLayout:
        groups = grouped.in_range(lo, hi)
        keys: dict[tuple[int, ...], int] = {}
        key_of = [keys.setdefault(g.plane_offsets, len(keys)) for g in groups]
        return _NativeLayout(
            np.array([g.items.ctypes.data for g in groups], dtype=np.int64),
            np.array([len(g.items) for g in groups], dtype=np.int64),
            np.array([(g.first - lo) * per_plane * grouped.item_bytes for g in groups], dtype=np.int64),
            np.array(key_of, dtype=np.int64),
            tuple(np.asarray(k, dtype=np.int64)[:, None] for k in keys))
    return paged.cached(("native_layout", kind, lo, hi, per_plane), build)


class _BatchParts:
    """The compiled loop's entries of one item size, gathered chunk by chunk."""

    def __init__(self, item: int) -> None:
        self.item, self.metas, self.counts, self.idx, self.used = item, [], [], [], 0

    def add(self, layout: _NativeLayout, local: np.ndarray, chunk_addr: int) -> None:
        """The entries of one chunk: its groups' rows start at ``chunk_addr``; ``local`` are the
        chunk's item indices inside one plane."""
        starts, lengths = [], []
        for offsets in layout.plane_offsets:
            idx = (offsets + local).reshape(-1)
            starts.append(self.used)
            lengths.append(len(idx))
            self.idx.append(idx)
            self.used += len(idx)
        meta = np.empty((len(layout.key_of), 4), dtype=np.int64)
        meta[:, 0], meta[:, 1] = layout.items_addr, layout.num_items
        meta[:, 2] = layout.rows_offset + chunk_addr
        meta[:, 3] = np.asarray(starts, dtype=np.int64)[layout.key_of]
        self.metas.append(meta)
        self.counts.append(np.asarray(lengths, dtype=np.int64)[layout.key_of])

    def batch(self) -> Batch:
        return Batch(np.concatenate(self.metas), np.concatenate(self.idx), np.concatenate(self.counts),
                     self.item)


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
    """numpy's gather (pack) or scatter (unpack) of items, one call per entry (the path without
    the compiled loop, and chunks with ``-1`` slots)."""
    for items, rows, idx, kept in work:
        if kept is not None:  # a chunk with -1 slots: only its kept rows
            if to_arena:
                rows[kept] = items[idx]
            else:
                items[idx] = rows[kept]
        elif to_arena:
            items.take(idx, 0, rows, "clip")  # mode "raise" would buffer `out`
        else:
            items.put(idx, rows, "clip")


def _copy_device(paged: PagedKV, slots: torch.Tensor, arena: torch.Tensor, offsets: torch.Tensor,
                 chunk_size: int, layers: tuple[int, int], *, to_arena: bool) -> None:
    """The same copy with torch ops on any device: a loop over planes and chunks."""
    views = unit_views(paged, word_bytes(paged.word_bytes, arena.data_ptr()))
    lo, hi = layers[0] * paged.num_kv, layers[1] * paged.num_kv
    slots = slots.view(-1, chunk_size)
    valid = slots >= 0
    index = unit_index(paged, views, slots * valid)  # [chunks, units]
    words = views.unit_bytes // views.word_bytes
    layer_bytes = paged.layer_bytes(chunk_size)
    start, span = layers[0] * layer_bytes, (layers[1] - layers[0]) * layer_bytes
    for c, off in enumerate(offsets.tolist()):
        chunk = arena[off + start:off + start + span].view(INT_BY_SIZE[views.word_bytes])
        chunk = chunk.view(hi - lo, -1, words)
        keep = valid[c].repeat_interleave(views.units_per_row).nonzero().flatten()
        idx = index[c][keep]
        for i, plane in enumerate(views.planes[lo:hi]):
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
