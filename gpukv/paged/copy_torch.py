"""The fast CPU path of pack/unpack: unit gathers straight into / out of the arena.

Every layout is moved in *units* (:mod:`gpukv.paged.units`): each plane is a 2-D
``[num_units, unit_words]`` view in the widest integer word, and a chunk moves with one gather
(pack) or scatter (unpack) of unit rows per plane: one memcpy per unit, no temporary. Index
tensors are built once per call. Where a plane's token rows are evenly packed (NHD kv-first, MLA)
and a chunk's slots are whole blocks in order (what a vLLM block table gives), the chunk moves in
whole blocks instead: ``chunk_size / block_size`` copies of ``block_size`` rows each: fewer,
larger memmoves (unpack gains most).

On CPU the copies run through numpy views of the same memory (zero-copy): ``ndarray.take(out=)``
and fancy assignment copy each unit with one memmove, with little per-call overhead, where
torch's ``index_copy_``/``index_put_`` copy word by word and its OpenMP ``index_select`` stalls on
a busy machine. numpy releases the GIL while copying, so a large call splits its planes over
``torch.get_num_threads()`` Python threads, as many as the plain copy it is measured against
uses. On other devices (``backend="torch"`` forced on CUDA) the same loop uses
``index_select(out=)`` / indexed assignment.
Arguments are validated by :mod:`gpukv.paged.copy`; this module assumes them correct.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from gpukv.paged.layout import INT_BY_SIZE, PagedKV, word_bytes
from gpukv.paged.units import UnitPlan, like, unit_index, unit_plan

_NP_INT_BY_SIZE = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}
# a CPU call uses one thread per 32 MiB it moves, up to torch's thread count (starting a thread
# pool costs ~0.5 ms, which smaller calls would not win back)
BYTES_PER_THREAD = 32 << 20


def pack_torch(paged: PagedKV, slots: torch.Tensor, arena: torch.Tensor, offsets: torch.Tensor, *,
               chunk_size: int, layers: tuple[int, int] | None = None) -> None:
    """Pages -> arena. ``slots`` int64 on the cache's device; ``offsets`` CPU int64; ``layers`` a
    validated ``(start, stop)`` or None for all (see :func:`gpukv.paged.copy.pack`)."""
    _copy(paged, slots, arena, offsets, chunk_size, layers, to_arena=True)


def unpack_torch(paged: PagedKV, slots: torch.Tensor, arena: torch.Tensor, offsets: torch.Tensor, *,
                 chunk_size: int, layers: tuple[int, int] | None = None) -> None:
    """Arena -> pages; the arguments mean what they do in :func:`pack_torch`."""
    _copy(paged, slots, arena, offsets, chunk_size, layers, to_arena=False)


def _copy(paged: PagedKV, slots: torch.Tensor, arena: torch.Tensor, offsets: torch.Tensor,
          chunk_size: int, layers: tuple[int, int] | None, *, to_arena: bool) -> None:
    on_cpu = arena.device.type == "cpu"
    start, stop = layers or (0, paged.num_layers)
    plan = unit_plan(paged, word_bytes(paged.word_bytes, arena.data_ptr()))
    word = plan.word_bytes
    kv = paged.num_kv
    planes = (plan.host_planes if on_cpu else plan.planes)[start * kv:stop * kv]
    per_row = plan.units_per_row
    shape = (len(planes), chunk_size * per_row, plan.unit_bytes // word)
    # index math on a few thousand ints: numpy on CPU (a microsecond an op, torch takes ten)
    slots = slots.view(-1, chunk_size).numpy() if on_cpu else slots.view(-1, chunk_size)
    memory = arena.numpy() if on_cpu else arena
    valid = slots >= 0
    full = valid.all(1).tolist()
    bs = paged.block_size
    blocked = _whole_blocks(paged, plan, slots)  # per chunk: move it block by block
    if any(blocked):
        block_planes = [p.view(paged.num_blocks, -1) if isinstance(p, torch.Tensor)
                        else p.reshape(paged.num_blocks, -1) for p in planes]  # contiguous: views
        block_index = slots[:, ::bs] // bs
    index = None if all(blocked) else unit_index(paged, plan, slots * valid)  # [chunks, units]
    layer_bytes = paged.layer_bytes(chunk_size)
    steps = []  # per chunk: (planes, its rows per plane, index into the planes, kept rows or None)
    for c, off in enumerate(offsets.tolist()):
        lo = off + start * layer_bytes
        chunk = _as_words(memory[lo:lo + (stop - start) * layer_bytes], word).reshape(shape)
        if blocked[c]:
            steps.append((block_planes, chunk.reshape(len(planes), chunk_size // bs, -1),
                          block_index[c], None))
        elif full[c]:
            steps.append((planes, chunk, index[c], None))
        else:
            keep = valid[c].repeat(per_row) if on_cpu else valid[c].repeat_interleave(per_row)
            keep = keep.nonzero()[0] if on_cpu else keep.nonzero().flatten()
            steps.append((planes, chunk, index[c][keep], keep))
    move = functools.partial(_move, steps, to_arena, on_cpu)
    moved = len(steps) * (stop - start) * layer_bytes
    threads = min(torch.get_num_threads(), len(planes), moved // BYTES_PER_THREAD)
    if not on_cpu or threads <= 1:
        move(0, len(planes))
        return
    # numpy releases the GIL while it copies: split the planes over torch's CPU thread count
    cuts = [len(planes) * k // threads for k in range(threads + 1)]
    with ThreadPoolExecutor(threads - 1) as pool:
        futures = [pool.submit(move, lo, hi) for lo, hi in zip(cuts[1:-1], cuts[2:])]
        move(cuts[0], cuts[1])
        for future in futures:
            future.result()


def _move(steps: list, to_arena: bool, on_cpu: bool, lo: int, hi: int) -> None:
    """Planes ``lo:hi`` of every chunk: one gather (pack) or scatter (unpack) of rows each."""
    for planes, chunk, idx, keep in steps:
        for i in range(lo, hi):
            plane, rows = planes[i], chunk[i]
            if keep is not None:  # a chunk with -1 slots: only its kept rows
                if to_arena:
                    rows[keep] = plane[idx]
                else:
                    plane[idx] = rows[keep]
            elif not to_arena:
                plane[idx] = rows
            elif on_cpu:
                plane.take(idx, 0, rows, "clip")  # mode "raise" would buffer `out`
            else:
                torch.index_select(plane, 0, idx, out=rows)


def _whole_blocks(paged: PagedKV, plan: UnitPlan, slots) -> list[bool]:
    """Per chunk: are its slots whole blocks in order, in planes whose blocks are contiguous?"""
    bs, num_chunks = paged.block_size, slots.shape[0]
    if not (slots.shape[1] % bs == 0 and plan.contiguous_blocks(bs)):
        return [False] * num_chunks
    grid = slots.reshape(num_chunks, -1, bs)
    whole = ((grid - grid[..., :1]) == like(range(bs), slots)).all(-1) & (grid[..., 0] % bs == 0)
    return whole.all(-1).tolist()


def _as_words(raw, word: int):
    if isinstance(raw, np.ndarray):
        return raw.view(_NP_INT_BY_SIZE[word])
    return raw.view(INT_BY_SIZE[word])
