"""Units: how the torch copy path cuts a token row into contiguous pieces.

A *unit* is the largest piece of a token row that is contiguous in the pages: the whole row for
NHD, MLA and SGLang pools; one head for HND, packed K|V and the vLLM CPU layout; one word where
heads are padded so that not even a head divides the strides. Token ``(block, pos)``'s row is
the units ``block * unit_strides[0] + pos * unit_strides[1] + unit_offsets`` of its plane (chunk
order, head-major). :class:`UnitViews` holds that cut and views each plane as a 2-D
``[num_units, unit_bytes / word]`` tensor in the widest integer word, for torch ops; the CPU path's
numpy views are in :mod:`gpukv.paged.groups`. Built once per cache and word (:meth:`PagedKV.cached`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gpukv.paged.layout import INT_BY_SIZE, PagedKV
from gpukv.paged.planes import plane_views


@dataclass(frozen=True, slots=True)
class UnitViews:
    """How one cache's rows split into units; ``planes`` are its planes (layer-major) as
    ``[num_units, unit_bytes // word_bytes]`` views in the ``word_bytes`` integer dtype."""

    word_bytes: int
    unit_bytes: int
    unit_strides: tuple[int, int]
    unit_offsets: tuple[int, ...]
    planes: tuple[torch.Tensor, ...]

    @property
    def units_per_row(self) -> int:
        return len(self.unit_offsets)


def unit_views(paged: PagedKV, word: int | None = None) -> UnitViews:
    """The unit cut of ``paged`` and its planes as unit rows of ``word``-byte integers (default:
    the pages' own word; an arena less aligned than the pages needs a narrower one)."""
    word = paged.word_bytes if word is None else word
    if paged.word_bytes % word:
        raise ValueError(f"word {word} does not divide the pages' word {paged.word_bytes}")
    return paged.cached(("unit_views", word), lambda: _build(paged, word))


def unit_index(paged: PagedKV, views: UnitViews, slots):
    """``[..., len(slots) * units_per_row]`` unit rows of valid ``slots`` (a tensor or a numpy
    array of slot numbers, last dim = tokens), in chunk order."""
    block, pos = slots // paged.block_size, slots % paged.block_size
    first = block * views.unit_strides[0] + pos * views.unit_strides[1]
    return (first[..., None] + like(views.unit_offsets, slots)).reshape(*slots.shape[:-1], -1)


def like(values, other):
    """``values`` as int64 where ``other`` lives (a numpy array, or a tensor on its device)."""
    if isinstance(other, np.ndarray):
        return np.asarray(values, dtype=np.int64)
    return torch.tensor(values, dtype=torch.int64, device=other.device)


def _build(paged: PagedKV, word: int) -> UnitViews:
    unit, strides, offsets = _cut(paged)
    num_units = ((paged.num_blocks - 1) * strides[0] + (paged.block_size - 1) * strides[1]
                 + max(offsets) + 1)
    planes = tuple(torch.as_strided(v, (num_units, unit), (unit, 1), v.storage_offset()).view(INT_BY_SIZE[word])
                   for v in plane_views(paged))
    return UnitViews(word, unit, strides, offsets, planes)


def void_items(raw: np.ndarray, item_bytes: int) -> np.ndarray:
    """A contiguous uint8 array as a 1-D array of ``item_bytes``-byte opaque items (a view)."""
    return raw.reshape(-1).view(np.dtype((np.void, item_bytes)))


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
