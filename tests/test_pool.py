"""ObjectPool scenarios: the rules that join the L1's structures (discard, settle, allocate with
eviction) and the write path, with exact events, slots and counters."""

from __future__ import annotations

import pytest

from gpukv.l1.entry import Status
from gpukv.l1.pool import ObjectPool
from gpukv.l1.slab import SlabArena

OK, NF, NW, OOM, LK = (Status.OK, Status.NOT_FOUND, Status.NOT_WRITABLE, Status.OUT_OF_MEMORY,
                       Status.LOCKED)


def make(*capacities: int) -> tuple[ObjectPool, list]:
    events: list = []
    pool = ObjectPool([SlabArena(c) for c in capacities],
                      on_event=lambda ev, entry, reason: events.append((ev, entry.key, reason)))
    return pool, events


def put(pool: ObjectPool, keys, device: int = 0, **kwargs) -> list:
    statuses, handles = pool.reserve_writes(keys, device, 1000, 1024, kwargs.get("temporary", False),
                                            "w", 10.0)
    assert statuses == [OK] * len(keys)
    pool.finish_writes(handles, kwargs.get("reader"), kwargs.get("count"), 20.0)
    return handles


def test_reserve_writes_refuses_live_keys_and_is_out_of_memory_from_the_first_key_without_room():
    pool, events = make(3 * 1024)
    (a,) = put(pool, ["a"])
    statuses, handles = pool.reserve_writes(["a", "b", "b", "c", "d", "e"], 0, 1000, 1024, False,
                                            "w", 10.0)
    # a is live, b twice in one call, c takes the last slot, d evicts a (idle), e finds nothing
    assert statuses == [NW, OK, NW, OK, OK, OOM] and handles[0] is handles[2] is handles[5] is None
    assert pool.evictions == [1] and events == [("stored", "a", "new"), ("removed", "a", "evicted")]
    assert a.doomed and [h.key for h in pool.writes.of_writer("w")] == ["b", "c", "d"]
    assert (pool.objects.num_live, pool.objects.num_ready, pool.arenas[0].used_bytes) == (3, 0, 3072)


def test_finish_writes_makes_ready_gives_shares_and_settles_a_temporary_without_reader():
    pool, events = make(4 * 1024)
    a, b = put(pool, ["a", "b"])
    t1, t2 = put(pool, ["t1", "t2"], temporary=True)  # no reader: released at once
    assert events == [("stored", "a", "new"), ("stored", "b", "new"), ("stored", "t1", "loaded"),
                      ("removed", "t1", "released"), ("stored", "t2", "loaded"),
                      ("removed", "t2", "released")]
    assert t1.doomed and t2.doomed and pool.arenas[0].used_bytes == 2048
    (t3,) = put(pool, ["t3"], temporary=True, reader="req", count=2)
    assert t3.shares == {"req": 2} and pool.holds.deadline_of(t3, "req") == 20.0
    assert list(pool.lrus[0].by_class[1024]) == [a, b]  # made idle in order; t3 is held
    assert pool.release_owner("req", None) == 2 and t3.doomed and pool.arenas[0].used_bytes == 2048


def test_a_discarded_pinned_object_keeps_its_slot_until_its_last_unpin():
    pool, events = make(2 * 1024)
    (a,) = put(pool, ["a"])
    _, (pin,) = pool.holds.pin(["a"], pool.objects)
    assert pool.delete(["a", "x"], force=False) == [LK, NF]  # pinned: locked
    assert pool.delete(["a"], force=True) == [OK]
    assert events[-1] == ("removed", "a", "deleted") and pool.holds.deferred_frees == 1
    assert pool.arenas[0].used_bytes == 1024 and pool.objects.get("a") is None
    _, settle = pool.holds.unpin([pin])
    pool.settle(settle)
    assert settle == [a] and pool.arenas[0].used_bytes == 0


def test_expire_and_release_owner_discard_writes_and_drop_shares():
    pool, events = make(4 * 1024)
    statuses, (w1, w2) = pool.reserve_writes(["w1", "w2"], 0, 1000, 1024, False, "slow", 10.0)
    statuses, (v,) = pool.reserve_writes(["v"], 0, 1000, 1024, False, "late", 30.0)
    (r,) = put(pool, ["r"], reader="req", count=3)  # read lease to 20
    assert pool.expire(9.0) == 0 and pool.expire(20.0) == 3
    assert (pool.expired_shares, pool.expired_writes) == (3, 2) and w1.doomed and w2.doomed
    assert pool.writes.awaits_writer(w1) and pool.arenas[0].used_bytes == 4096  # still pinned
    assert pool.release_owner("late", None) == 0 and v.doomed and not r.doomed
    pool.abort_writes([w1, w2, v])  # the writers let go: slots back
    assert pool.arenas[0].used_bytes == 1024 and pool.writes.num_discarded == 0
    assert [e for e in events if e[0] == "removed"] == []  # none of them was ever readable


def test_clear_and_stats_count_every_structure():
    pool, _ = make(4 * 1024, 2 * 1024)
    a, b = put(pool, ["a", "b"])
    (c,) = put(pool, ["c"], device=1, reader="req", count=2)
    pool.reserve_writes(["w"], 1, 300, 512, False, "w", 10.0)
    stats = pool.stats()
    assert stats.pop("devices") == [
        dict(used_bytes=2048, capacity_bytes=4096, objects=2, read_locked=0, shares=0, evictions=0),
        dict(used_bytes=1536, capacity_bytes=2048, objects=2, read_locked=1, shares=2, evictions=0)]
    assert stats == dict(objects=4, ready=3, writing=1, read_locked=1, pinned=0, shares=2,
                         used_bytes=3584, capacity_bytes=6144, evictions=0, expired_shares=0,
                         expired_writes=0, deferred_frees=0, slabs_in_use=4, leases=1, owners=1)
    assert pool.clear() == 2 and a.doomed and b.doomed and not c.doomed  # c is held


def test_a_key_that_fails_mid_call_leaves_the_writes_before_it_whole():
    pool, _ = make(4 * 1024)
    with pytest.raises(TypeError, match="unhashable"):
        pool.reserve_writes(["a", ["not", "hashable"], "b"], 0, 1000, 1024, False, "w", 10.0)
    (a,) = pool.writes.of_writer("w")  # a is a live write in every book, b was never made
    assert a.key == "a" and pool.objects.get("a") is a and pool.objects.num_live == 1
    assert pool.writes.expired(10.0) == [a]
    pool.finish_writes([a], None, None, 20.0)
    assert a.ready and len(pool.writes) == 0 and pool.arenas[0].used_bytes == 1024
