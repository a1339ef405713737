"""One L1 object's record, and the per-key outcomes of L1 calls.

An :class:`Entry` is also the *handle* a copy holds: ``reserve_write_slots`` and ``pin`` return
entries, and ``finish_write`` / ``abort_write`` / ``unpin`` / ``end_read`` take them back. A handle
names one object, never a key: if the object is discarded while a copy holds it (expired write
lease, a force delete, the writer unregistered) its key may be stored afresh in another slot,
and the handle still points at the old slot, which is not reused until the last pin is gone.

Each mutable field has one writer, the structure that owns its invariant: ``ready`` and
``doomed`` the object table (:mod:`gpukv.l1.objects`), ``shares`` the share book
(:mod:`gpukv.l1.shares`), ``pins`` the pin counts (:mod:`gpukv.l1.pins`), ``stamp`` and ``lru``
the size-class LRU (:mod:`gpukv.l1.eviction`). The rest is fixed when the write is reserved.
"""

from __future__ import annotations

import enum
import operator
from dataclasses import dataclass, field
from typing import Hashable

from gpukv.constants import MAX_READERS


class Status(enum.Enum):
    """Per-key outcome of an L1 call."""

    OK = "OK"
    NOT_FOUND = "NOT_FOUND"
    NOT_READY = "NOT_READY"
    NOT_WRITABLE = "NOT_WRITABLE"
    WRONG_STATE = "WRONG_STATE"
    LOCKED = "LOCKED"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"


@dataclass(slots=True, eq=False, init=False)
class Entry:
    """An object in one device arena. Read-only for callers: ``key``, ``device`` (arena index),
    ``offset`` (bytes into that arena), ``nbytes``; everything else belongs to the manager's
    structures (see the module docstring). Hashed by identity."""

    key: Hashable
    device: int
    nbytes: int
    slot_bytes: int
    offset: int
    temporary: bool
    writer: Hashable  # owner of the unfinished write
    write_deadline: float
    ready: bool
    doomed: bool  # discarded: invisible, freed when the last pin goes
    pins: int  # copies in progress (a write holds one from reserve to finish/abort)
    stamp: int  # LRU recency (larger = more recent)
    shares: dict[Hashable, int]  # owner -> count
    lru: dict | None = field(repr=False)  # its device's LRU of its size class

    def __init__(self, key: Hashable, device: int, nbytes: int, slot_bytes: int, offset: int,
                 temporary: bool, writer: Hashable, write_deadline: float,
                 lru: dict | None) -> None:
        """A new write: not ready, holding the write's own pin, no shares. (Written out, not
        generated: the write path makes one per chunk, and a generated ``__init__`` would parse
        keyword defaults and call a factory for ``shares``.)"""
        self.key, self.device, self.nbytes, self.slot_bytes = key, device, nbytes, slot_bytes
        self.offset, self.temporary, self.writer = offset, temporary, writer
        self.write_deadline, self.lru = write_deadline, lru
        self.ready = self.doomed = False
        self.pins, self.stamp, self.shares = 1, 0, {}

    @property
    def readers(self) -> int:
        """Shares held by all owners (a sum: the hot paths test ``shares`` itself)."""
        return sum(self.shares.values())

    @property
    def idle(self) -> bool:
        """Ready, unlocked and unpinned: evictable."""
        return self.ready and not self.shares and not self.pins and not self.doomed


def share_count(extra_count: int) -> int:
    """``1 + extra_count`` after checking ``0 <= extra_count < MAX_READERS`` (ValueError)."""
    extra = operator.index(extra_count)
    if not 0 <= extra < MAX_READERS:
        raise ValueError(f"extra_count must be in [0, {MAX_READERS - 1}], got {extra_count!r}")
    return extra + 1
