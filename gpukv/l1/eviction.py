"""L1 eviction: the ready, unlocked objects in one LRU per size class, and the choice of victims.

Every *idle* object (ready, no shares, no pins, not discarded) is in the LRU of its size class,
ordered by the moment it last became idle (least recent first). The hold book
(:mod:`gpukv.l1.holds`) *touches* an object when it lets go of its last hold (a ``finish_read``,
``unpin``, ``end_read``, ``expire`` or ``release_owner``, or a finished write's own pin): it stamps
the object from its recency counter (larger = more recent) and moves it to the end of its class's
OrderedDict, which the object carries (``entry.lru``, from ``add_class``), with no call per
object. So a read refreshes its recency. Taking a share or a pin does *not* take an object out
(that would cost a dictionary operation per key on the lookup path): the LRU may also hold objects
that are busy again, which the victim choice skips and drops, and which their next touch puts
back. Each class's OrderedDict is keyed by the object itself (identity hash: no key hashing).

``victims(slot_bytes)`` is the policy, asked only when the slab arena has no free slot of that size:

1. the LRU idle object of the *same* class (frees a slot there);
2. else a whole slab of another class: among slabs whose objects are all idle, the one whose most
   recently used object is oldest (ties: lowest start), so its bytes return to the arena;
3. else nothing. The caller frees the victims and asks again until the write fits or nothing is
   evictable (then OUT_OF_MEMORY; evictions done stay done).

Not thread-safe: the L1 manager's lock guards it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, Protocol, TypeVar

from gpukv.l1.slab import Slab, SlabArena


class Evictable(Protocol):
    """What the LRU needs of an object (hashed by identity): slot, place in the arena, recency
    stamp, its class's LRU, and whether it is idle now."""

    slot_bytes: int
    offset: int
    stamp: int
    lru: OrderedDict | None

    @property
    def idle(self) -> bool: ...


_T = TypeVar("_T", bound=Evictable)


def touch(obj: Evictable, stamp: int) -> None:
    """``obj`` just became idle: give it ``stamp`` (the newest) and make it the most recent of its
    class (``obj.lru``). The hold book's hot loops inline these lines."""
    obj.stamp = stamp
    lru = obj.lru
    try:
        lru.move_to_end(obj)
    except KeyError:  # the LRU dropped it while it was busy
        lru[obj] = obj


class SizeClassLRU(Generic[_T]):
    """Objects by size class: ``by_class[slot_bytes]`` is an OrderedDict ``object -> object``,
    least recently idle first; every idle object is there, busy ones may be."""

    __slots__ = ("by_class", "_slab")

    def __init__(self, slab: SlabArena) -> None:
        """Choose victims among the objects of ``slab`` (it tells which slab holds an offset)."""
        self.by_class: dict[int, OrderedDict[_T, _T]] = {}
        self._slab = slab

    def add_class(self, slot_bytes: int) -> OrderedDict[_T, _T]:
        """Make room for objects of ``slot_bytes`` (idempotent); returns that class's LRU."""
        lru = self.by_class.get(slot_bytes)
        if lru is None:
            lru = self.by_class[slot_bytes] = OrderedDict()
        return lru

    def discard(self, obj: _T) -> None:
        """Take ``obj`` out if it is here (it is being discarded)."""
        self.by_class[obj.slot_bytes].pop(obj, None)

    def pop_all(self) -> list[_T]:
        """Empty the LRUs; returns the idle objects, class by class, least recently used first."""
        out: list[_T] = []
        for lru in self.by_class.values():
            out.extend(obj for obj in lru.values() if obj.idle)
            lru.clear()
        return out

    def victims(self, slot_bytes: int) -> list[_T]:
        """Remove and return the objects to evict for one ``slot_bytes`` slot (see the module
        docstring); [] when nothing useful is evictable. The caller frees them."""
        same = self.by_class.get(slot_bytes)
        while same:
            obj = same.popitem(last=False)[1]
            if obj.idle:
                return [obj]
        by_slab: dict[Slab, list[_T]] = {}  # slab of another class -> its idle objects
        for lru in self.by_class.values():
            for obj in lru.values():
                if obj.idle:
                    by_slab.setdefault(self._slab.slab_of(obj.offset), []).append(obj)
        whole = [(max(o.stamp for o in objs), slab.start, objs)
                 for slab, objs in by_slab.items() if len(objs) == slab.num_used]
        if not whole:
            return []
        victims = min(whole, key=lambda t: t[:2])[2]
        for obj in victims:
            del self.by_class[obj.slot_bytes][obj]
        return victims
