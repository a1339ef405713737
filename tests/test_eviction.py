"""SizeClassLRU scenarios: recency per size class, busy objects skipped, the same class first,
then the whole slab whose newest object is oldest, and nothing when nothing is idle."""

from __future__ import annotations

from gpukv.l1.entry import Entry
from gpukv.l1.eviction import SizeClassLRU, touch
from gpukv.l1.slab import SlabArena


class Objects:
    """Idle objects in real slab slots (the LRU maps an offset to its slab), touched in order."""

    def __init__(self, capacity: int, slab_bytes: int) -> None:
        self.arena = SlabArena(capacity, slab_bytes=slab_bytes)
        self.lru: SizeClassLRU[Entry] = SizeClassLRU(self.arena)
        self.stamp = 0

    def put(self, key: str, slot_bytes: int) -> Entry:
        entry = Entry(key, 0, slot_bytes, slot_bytes, self.arena.alloc(slot_bytes), False, None,
                      0.0, self.lru.add_class(slot_bytes))
        entry.ready, entry.pins = True, 0
        self.touch(entry)
        return entry

    def touch(self, entry: Entry) -> None:
        self.stamp += 1
        touch(entry, self.stamp)


def keys(objs) -> list[str]:
    return [o.key for o in objs]


def test_the_same_class_gives_its_least_recently_idle_object():
    objs = Objects(8 * 1024, 2048)
    a, b, c = (objs.put(k, 1024) for k in "abc")
    objs.touch(a)  # a read: b c a
    assert keys(objs.lru.victims(1024)) == ["b"] and keys(objs.lru.by_class[1024]) == ["c", "a"]
    c.shares["r"] = 1  # c is read-locked: skipped and dropped from the LRU
    assert keys(objs.lru.victims(1024)) == ["a"] and keys(objs.lru.by_class[1024]) == []
    assert objs.lru.victims(1024) == []  # c is busy: nothing of this class or any other
    c.shares.clear()
    objs.touch(c)  # its release puts it back, as the most recent
    assert keys(objs.lru.victims(1024)) == ["c"]


def test_else_the_whole_slab_whose_newest_object_is_oldest_ties_to_the_lowest_start():
    objs = Objects(6 * 1024, 2048)  # three slabs of 2 KiB: two 1 KiB slots, or one 2 KiB slot
    a1, a2, a3, a4 = (objs.put(k, 1024) for k in ["a1", "a2", "a3", "a4"])  # S0 = a1 a2, S1 = a3 a4
    big = objs.put("B", 2048)  # S2
    objs.touch(a1)  # S0's newest is now newer than S1's
    big.pins = 1  # the 2 KiB class has no idle object
    assert keys(objs.lru.victims(2048)) == ["a3", "a4"]  # all of S1, out of the LRU
    assert keys(objs.lru.by_class[1024]) == ["a2", "a1"]
    a2.pins = 1  # S0 is not all idle any more: nothing is a whole idle slab
    assert objs.lru.victims(2048) == [] and keys(objs.lru.by_class[1024]) == ["a2", "a1"]


def test_ties_between_whole_slabs_go_to_the_lowest_start():
    objs = Objects(4 * 1024, 2048)
    low, high = objs.put("low", 2048), objs.put("high", 2048)
    high.stamp = low.stamp  # (touched by one call: equally recent)
    assert keys(objs.lru.victims(1024)) == ["low"] and keys(objs.lru.victims(1024)) == ["high"]


def test_pop_all_returns_the_idle_objects_class_by_class_and_empties_the_lru():
    objs = Objects(8 * 1024, 2048)
    a, b = objs.put("a", 1024), objs.put("b", 1024)
    c = objs.put("c", 2048)
    objs.touch(a)  # b a | c
    b.pins = 1
    assert keys(objs.lru.pop_all()) == ["a", "c"]
    assert all(not lru for lru in objs.lru.by_class.values())
    objs.touch(c)
    objs.lru.discard(c)  # discarded: out of the LRU; discarding twice is a no-op
    objs.lru.discard(c)
    assert objs.lru.victims(2048) == [] and objs.lru.add_class(2048) is objs.lru.by_class[2048]
