"""The L1 arena: one device uint8 tensor carved into slabs of fixed-size, 256-byte aligned slots.

Layout and policy:

- The arena is allocated once (``capacity_bytes`` bytes). Objects live at byte offsets into it,
  which is what the copy kernels take; a buffer is a view ``arena[offset:offset + nbytes]``.
- A *size class* is one aligned slot size (``aligned_bytes(nbytes)``); objects of 1000 and 1010
  bytes share the 1024-byte class. Each class owns slabs: contiguous runs of whole slots.
- A full slab holds ``max(1, slab_bytes // slot_bytes)`` slots. The default ``slab_bytes`` is
  4 MiB, capped at ``capacity_bytes // MIN_SLABS`` so that a small arena still has room for several
  classes (with a large slot a slab is then one slot). When no free arena range fits a full slab, the class takes a *partial* slab of as many whole slots as the largest free range
  holds, so a capacity of exactly ``k`` slots holds ``k`` objects.
- Slot alloc and free are O(1): a bump index plus a stack of freed offsets per slab, and per class
  a dict of slabs that still have a free slot. Taking a new slab scans the free ranges (few).
- A slab whose last slot is freed goes back to the arena at once (coalescing with its free
  neighbours), so any class can reuse its bytes.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import torch

ALIGN_BYTES = 256
DEFAULT_SLAB_BYTES = 4 << 20
MIN_SLABS = 16


def aligned_bytes(nbytes: int) -> int:
    """``nbytes`` rounded up to a multiple of ``ALIGN_BYTES`` (the slot size of its class)."""
    return -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES


@dataclass(slots=True, eq=False)
class Slab:
    """A run of ``num_slots`` slots of ``slot_bytes`` each, starting at byte ``start``."""

    start: int
    slot_bytes: int
    num_slots: int
    num_used: int = 0
    next_unused: int = 0  # slots at index >= next_unused were never handed out
    free_offsets: list[int] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return self.num_slots * self.slot_bytes

    def used_offsets(self) -> list[int]:
        """Offsets of the slots currently handed out (slow path: eviction and tests)."""
        freed = set(self.free_offsets)
        offsets = range(self.start, self.start + self.next_unused * self.slot_bytes, self.slot_bytes)
        return [off for off in offsets if off not in freed]


@dataclass(slots=True, eq=False)
class _SizeClass:
    slot_bytes: int
    slots_per_slab: int
    slabs: dict[Slab, None] = field(default_factory=dict)
    with_free_slot: dict[Slab, None] = field(default_factory=dict)


class SlabArena:
    """Fixed-size slot allocator over one device arena. Not thread-safe: the L1 manager locks."""

    def __init__(self, capacity_bytes: int, *, device: torch.device | str = "cpu",
                 slab_bytes: int | None = None, memory: torch.Tensor | None = None) -> None:
        """Carve ``memory`` (a 1-D uint8 tensor of at least ``capacity_bytes``, e.g. a shared
        arena of :mod:`gpukv.l1.arena`), or a new ``torch.empty`` of ``capacity_bytes`` on
        ``device``. ``slab_bytes`` (target slab size) defaults to
        ``min(4 MiB, capacity_bytes // MIN_SLABS)``."""
        if not isinstance(capacity_bytes, numbers.Integral) or capacity_bytes < ALIGN_BYTES:
            raise ValueError(f"capacity_bytes must be an int >= {ALIGN_BYTES}, got {capacity_bytes!r}")
        capacity_bytes = int(capacity_bytes)
        if slab_bytes is None:
            slab_bytes = max(ALIGN_BYTES, min(DEFAULT_SLAB_BYTES, capacity_bytes // MIN_SLABS))
        if not isinstance(slab_bytes, int) or slab_bytes < ALIGN_BYTES:
            raise ValueError(f"slab_bytes must be an int >= {ALIGN_BYTES}, got {slab_bytes!r}")
        if memory is None:
            memory = torch.empty(capacity_bytes, dtype=torch.uint8, device=device)
        elif memory.dtype != torch.uint8 or memory.dim() != 1 or memory.numel() < capacity_bytes:
            raise ValueError(f"memory must be a 1-D uint8 tensor of >= {capacity_bytes} bytes, got "
                             f"{tuple(memory.shape)} {memory.dtype}")
        self.arena = memory
        self.capacity_bytes = capacity_bytes
        self.slab_bytes = slab_bytes
        self.used_bytes = 0
        usable = capacity_bytes // ALIGN_BYTES * ALIGN_BYTES
        self._free_by_start: dict[int, int] = {0: usable}  # free range start -> end
        self._free_by_end: dict[int, int] = {usable: 0}  # free range end -> start
        self._classes: dict[int, _SizeClass] = {}
        self._slab_of: dict[int, Slab] = {}  # offset of each used slot -> its slab

    # -- slots ---------------------------------------------------------------------------------
    @staticmethod
    def slot_bytes_for(nbytes: int) -> int:
        """The slot size (size class) of an object of ``nbytes``."""
        return aligned_bytes(nbytes)

    def alloc(self, slot_bytes: int) -> int | None:
        """Hand out one slot of ``slot_bytes`` (an aligned size); its offset, or None when full."""
        assert slot_bytes > 0 and slot_bytes % ALIGN_BYTES == 0, slot_bytes
        cls = self._classes.get(slot_bytes)
        if cls is None:
            cls = self._classes[slot_bytes] = _SizeClass(slot_bytes, max(1, self.slab_bytes // slot_bytes))
        if cls.with_free_slot:
            slab = next(iter(cls.with_free_slot))
        else:
            slab = self._new_slab(cls)
            if slab is None:
                return None
        if slab.free_offsets:
            offset = slab.free_offsets.pop()
        else:
            offset = slab.start + slab.next_unused * slot_bytes
            slab.next_unused += 1
        slab.num_used += 1
        if slab.num_used == slab.num_slots:
            del cls.with_free_slot[slab]
        self._slab_of[offset] = slab
        self.used_bytes += slot_bytes
        return offset

    def free(self, offset: int) -> bool:
        """Take back the slot at ``offset``; True when its slab emptied and went back to the arena."""
        slab = self._slab_of.pop(offset)
        slab.num_used -= 1
        self.used_bytes -= slab.slot_bytes
        cls = self._classes[slab.slot_bytes]
        if slab.num_used == 0:
            del cls.slabs[slab]
            cls.with_free_slot.pop(slab, None)
            self._release_range(slab.start, slab.start + slab.nbytes)
            return True
        slab.free_offsets.append(offset)
        cls.with_free_slot[slab] = None
        return False

    def slab_of(self, offset: int) -> Slab:
        """The slab holding the used slot at ``offset``."""
        return self._slab_of[offset]

    def has_free_slot(self, slot_bytes: int) -> bool:
        """Whether an existing slab of this class has a free slot (no new slab needed)."""
        cls = self._classes.get(slot_bytes)
        return cls is not None and bool(cls.with_free_slot)

    def slabs(self, slot_bytes: int | None = None) -> list[Slab]:
        """Slabs in use, of one class or of all classes."""
        if slot_bytes is not None:
            cls = self._classes.get(slot_bytes)
            return list(cls.slabs) if cls else []
        return [slab for cls in self._classes.values() for slab in cls.slabs]

    @property
    def num_slabs(self) -> int:
        return sum(len(cls.slabs) for cls in self._classes.values())

    @property
    def free_ranges(self) -> list[tuple[int, int]]:
        """Free arena ranges ``(start, end)`` not owned by any slab, sorted."""
        return sorted(self._free_by_start.items())

    # -- slabs ---------------------------------------------------------------------------------
    def _new_slab(self, cls: _SizeClass) -> Slab | None:
        if not self._free_by_start:  # the common case once the arena is full
            return None
        full = cls.slots_per_slab * cls.slot_bytes
        fits = [start for start, end in self._free_by_start.items() if end - start >= full]
        if fits:
            start, num_slots = min(fits), cls.slots_per_slab
        else:  # a partial slab from the largest free range, if one slot fits there
            best = max(self._free_by_start.items(), key=lambda r: (r[1] - r[0], -r[0]), default=None)
            if best is None or best[1] - best[0] < cls.slot_bytes:
                return None
            start, num_slots = best[0], (best[1] - best[0]) // cls.slot_bytes
        end = self._free_by_start.pop(start)
        del self._free_by_end[end]
        slab_end = start + num_slots * cls.slot_bytes
        if slab_end < end:
            self._free_by_start[slab_end] = end
            self._free_by_end[end] = slab_end
        slab = Slab(start, cls.slot_bytes, num_slots)
        cls.slabs[slab] = None
        cls.with_free_slot[slab] = None
        return slab

    def _release_range(self, start: int, end: int) -> None:
        if end in self._free_by_start:  # merge with the free range just after
            new_end = self._free_by_start.pop(end)
            del self._free_by_end[new_end]
            end = new_end
        if start in self._free_by_end:  # merge with the free range just before
            new_start = self._free_by_end.pop(start)
            del self._free_by_start[new_start]
            start = new_start
        self._free_by_start[start] = end
        self._free_by_end[end] = start
