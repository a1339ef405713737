"""Plane groups: the CPU path's view of a cache as few numpy arrays of whole items.

numpy moves opaque items (``void`` dtype) with one memmove each in ``take`` / ``put``, but each
call costs a few hundred nanoseconds. Planes that live in one buffer at offsets that are a
multiple of the item size (K and V of a layer tensor, or every layer when vLLM allocates all of
them as views of one buffer) form one *group*: one 1-D item array over that buffer, so one call
moves a chunk's rows of all the group's planes. Two item sizes:

* ``units``: one unit of a row (:mod:`gpukv.paged.units`); token ``(block, pos)``'s units of plane
  ``p`` are items ``plane_offsets[p] + unit_index(...)``;
* ``blocks``: a whole block's rows, where a block's ``block_size`` rows are contiguous (NHD, MLA)
  and the block stride is a multiple of that: block ``b`` of plane ``p`` is item
  ``plane_offsets[p] + b * block_step``.

Built once per cache and item kind (:meth:`PagedKV.cached`); only for CPU caches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gpukv.paged.layout import PagedKV
from gpukv.paged.planes import plane_tensor
from gpukv.paged.units import unit_views, void_items


@dataclass(frozen=True, slots=True)
class Group:
    """Planes ``first .. stop - 1``: ``items`` (1-D void numpy array) over their buffer, and the
    item index of each plane's block 0, token 0, unit 0."""

    first: int
    stop: int
    items: np.ndarray
    plane_offsets: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class PlaneGroups:
    """A cache's plane groups for one item size; ``block_step`` is 0 for ``"units"`` items."""

    item_bytes: int
    block_step: int  # items from one block to the next
    groups: tuple[Group, ...]

    def in_range(self, lo: int, hi: int) -> list[Group]:
        """The groups cut to planes ``lo .. hi - 1``."""
        out = []
        for g in self.groups:
            a, b = max(g.first, lo), min(g.stop, hi)
            if a < b:
                out.append(Group(a, b, g.items, g.plane_offsets[a - g.first:b - g.first]))
        return out


def plane_groups(paged: PagedKV, kind: str) -> PlaneGroups | None:
    """The plane groups of a CPU cache in ``"units"`` or ``"blocks"`` items; None for
    ``"blocks"`` where a block's rows are not one contiguous run."""
    return paged.cached(("plane_groups", kind), lambda: _build(paged, kind))


def _build(paged: PagedKV, kind: str) -> PlaneGroups | None:
    views = unit_views(paged)
    unit = views.unit_bytes
    if kind == "units":
        item, step = unit, 0
        last = ((paged.num_blocks - 1) * views.unit_strides[0] + (paged.block_size - 1)
                * views.unit_strides[1] + max(views.unit_offsets))  # last unit of a plane
    else:
        item = unit * paged.block_size
        if not (paged.block_size > 1 and views.unit_offsets == (0,) and views.unit_strides[1] == 1
                and paged.stride_block_bytes % item == 0):
            return None
        step = paged.stride_block_bytes // item
        last = (paged.num_blocks - 1) * step
    bases = [p for row in paged.base_ptrs for p in row]
    storages = [plane_tensor(paged, layer, kv).untyped_storage()
                for layer in range(paged.num_layers) for kv in range(paged.num_kv)]
    groups, first = [], 0
    for p in range(1, len(bases) + 1):
        if p < len(bases) and storages[p].data_ptr() == storages[first].data_ptr() \
                and bases[p] >= bases[first] and (bases[p] - bases[first]) % item == 0:
            continue
        offsets = tuple((b - bases[first]) // item for b in bases[first:p])
        groups.append(Group(first, p, _items(storages[first], bases[first], (max(offsets) + last + 1) * item,
                                             item, paged.device), offsets))
        first = p
    return PlaneGroups(item, step, tuple(groups))


def _items(storage, start: int, nbytes: int, item: int, device: torch.device) -> np.ndarray:
    """``nbytes`` of ``storage`` from address ``start`` as 1-D void items (a view)."""
    raw = torch.empty(0, dtype=torch.uint8, device=device).set_(storage)
    view = torch.as_strided(raw, (nbytes,), (1,), start - storage.data_ptr())
    return void_items(view.numpy(), item)
