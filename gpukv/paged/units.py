"""Units: how the torch copy path cuts a token row into contiguous pieces.

A *unit* is the largest piece of a token row that is contiguous in the pages: the whole row for
NHD, MLA and SGLang pools; one head for HND, packed K|V and the vLLM CPU layout; one word where
heads are padded so that not even a head divides the strides. Each plane is then a 2-D
``[num_units, unit_bytes / word]`` view in the widest integer word, and token ``(block, pos)``'s
row is the units ``block * unit_strides[0] + pos * unit_strides[1] + unit_offsets`` (chunk order,
head-major). A plan is built once per cache and word (:meth:`PagedKV.cached`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gpukv.paged.layout import INT_BY_SIZE, PagedKV
from gpukv.paged.planes import plane_views


@dataclass(frozen=True, slots=True)
class UnitPlan:
    """``planes``: per plane (layer-major) a ``[num_units, unit_bytes // word_bytes]`` view in the
    ``word_bytes`` integer dtype; ``host_planes`` the same as numpy arrays on a CPU cache (else
    empty). ``contiguous_blocks``: a block's rows are one contiguous run of ``block_size`` units."""

    word_bytes: int
    unit_bytes: int
    unit_strides: tuple[int, int]
    unit_offsets: tuple[int, ...]
    planes: tuple[torch.Tensor, ...]
    host_planes: tuple[np.ndarray, ...]

    @property
    def units_per_row(self) -> int:
        return len(self.unit_offsets)

    def contiguous_blocks(self, block_size: int) -> bool:
        return block_size > 1 and self.unit_offsets == (0,) and self.unit_strides == (block_size, 1)


def unit_plan(paged: PagedKV, word: int | None = None) -> UnitPlan:
    """The plan of ``paged`` in ``word``-byte integers (default: the pages' own word; an arena less
    aligned than the pages needs a narrower one)."""
    word = paged.word_bytes if word is None else word
    if paged.word_bytes % word:
        raise ValueError(f"word {word} does not divide the pages' word {paged.word_bytes}")
    return paged.cached(("unit_plan", word), lambda: _build(paged, word))


def unit_index(paged: PagedKV, plan: UnitPlan, slots):
    """``[..., len(slots) * units_per_row]`` unit rows of valid ``slots`` (a tensor or a numpy
    array of slot numbers, last dim = tokens), in chunk order."""
    block, pos = slots // paged.block_size, slots % paged.block_size
    first = block * plan.unit_strides[0] + pos * plan.unit_strides[1]
    return (first[..., None] + like(plan.unit_offsets, slots)).reshape(*slots.shape[:-1], -1)


def like(values, other):
    """``values`` as int64 where ``other`` lives (a numpy array, or a tensor on its device)."""
    if isinstance(other, np.ndarray):
        return np.asarray(values, dtype=np.int64)
    return torch.tensor(values, dtype=torch.int64, device=other.device)


def _build(paged: PagedKV, word: int) -> UnitPlan:
    unit, strides, offsets = _cut(paged)
    num_units = ((paged.num_blocks - 1) * strides[0] + (paged.block_size - 1) * strides[1]
                 + max(offsets) + 1)
    planes = tuple(_unit_view(v, num_units, unit, word) for v in plane_views(paged))
    host = tuple(p.numpy() for p in planes) if paged.device.type == "cpu" else ()
    return UnitPlan(word, unit, strides, offsets, planes, host)


def _cut(paged: PagedKV) -> tuple[int, tuple[int, int], tuple[int, ...]]:
    """(unit bytes, (block, token) strides in units, a row's unit offsets in head-major order)."""
    s_block, s_token = paged.stride_block_bytes, paged.stride_token_bytes
    head = paged.head_bytes
    s_head = paged.stride_head_bytes if paged.num_heads > 1 else head
    row = paged.row_bytes
    if s_head == head and s_block % row == 0 and s_token % row == 0:
        return row, (s_block // row, s_token // row), (0,)
    whole_heads = s_block % head == 0 and s_token % head == 0 and s_head % head == 0
    unit = head if whole_heads else paged.word_bytes
    offsets = tuple((h * s_head + w) // unit
                    for h in range(paged.num_heads) for w in range(0, head, unit))
    return unit, (s_block // unit, s_token // unit), offsets


def _unit_view(plane: torch.Tensor, num_units: int, unit: int, word: int) -> torch.Tensor:
    """``[num_units, unit // word]`` word view of the memory that starts at ``plane``'s first byte."""
    units = torch.as_strided(plane, (num_units, unit), (unit, 1), plane.storage_offset())
    return units.view(INT_BY_SIZE[word])
