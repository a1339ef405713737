"""L1 eviction: the ready, unlocked objects in one LRU per size class, and the choice of victims.

An object is here exactly while it is ready and unlocked: the L1 manager ``push``es it when it
becomes so (``finish_write``, or the ``finish_read``/``expire``/``release_owner`` that drops its read
count to zero) and takes it out when it is read-locked, deleted or evicted. ``push`` stamps it with
a counter (larger = more recent), so a read refreshes its recency.

``victims(slot_bytes)`` is the policy, asked only when the slab arena has no free slot of that size:

1. the LRU object of the *same* class (frees a slot there);
2. else a whole slab of another class: among slabs whose objects are all evictable, the one whose
   most recently used object is oldest (ties: lowest start), so its bytes return to the arena;
3. else nothing. The caller frees the victims and asks again until the write fits or nothing is
   evictable (then OUT_OF_MEMORY; evictions done stay done).

The L1 hot loops read and write ``by_class`` and ``stamp`` directly (an attribute lookup per call,
not a method call per key), keeping the rules above. Not thread-safe: the L1 manager's lock
guards it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, Hashable, Protocol, TypeVar

from gpukv.l1.slab import Slab, SlabArena


class Evictable(Protocol):
    """What the LRU needs of an object: its key, slot, place in the arena and recency stamp."""

    key: Hashable
    slot_bytes: int
    offset: int
    stamp: int


_T = TypeVar("_T", bound=Evictable)


class SizeClassLRU(Generic[_T]):
    """Evictable objects by size class: ``by_class[slot_bytes]`` is an OrderedDict ``key ->
    object``, least recently used first; ``stamp`` is the latest recency stamp handed out."""

    __slots__ = ("by_class", "stamp", "_slab")

    def __init__(self, slab: SlabArena) -> None:
        """Choose victims among the objects of ``slab`` (it tells which slab holds an offset)."""
        self.by_class: dict[int, OrderedDict[Hashable, _T]] = {}
        self.stamp = 0
        self._slab = slab

    def add_class(self, slot_bytes: int) -> None:
        """Make room for objects of ``slot_bytes`` (idempotent)."""
        if slot_bytes not in self.by_class:
            self.by_class[slot_bytes] = OrderedDict()

    def push(self, obj: _T) -> None:
        """Add ``obj`` as the most recently used of its class (its class was added)."""
        self.stamp += 1
        obj.stamp = self.stamp
        self.by_class[obj.slot_bytes][obj.key] = obj

    def remove(self, obj: _T) -> None:
        """Take ``obj`` out; KeyError if it is not here."""
        del self.by_class[obj.slot_bytes][obj.key]

    def pop_all(self) -> list[_T]:
        """Remove and return every object, class by class, least recently used first."""
        out: list[_T] = []
        for lru in self.by_class.values():
            out.extend(lru.values())
            lru.clear()
        return out

    def victims(self, slot_bytes: int) -> list[_T]:
        """Remove and return the objects to evict for one ``slot_bytes`` slot (see the module
        docstring); [] when nothing useful is evictable. The caller frees them."""
        same = self.by_class.get(slot_bytes)
        if same:
            return [same.popitem(last=False)[1]]
        by_slab: dict[Slab, list[_T]] = {}  # slab of another class -> its evictable objects
        for lru in self.by_class.values():
            for obj in lru.values():
                by_slab.setdefault(self._slab.slab_of(obj.offset), []).append(obj)
        whole = [(max(o.stamp for o in objs), slab.start, objs)
                 for slab, objs in by_slab.items() if len(objs) == slab.num_used]
        if not whole:
            return []
        victims = min(whole, key=lambda t: t[:2])[2]
        for obj in victims:
            self.remove(obj)
        return victims
