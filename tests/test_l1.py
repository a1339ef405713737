"""L1Manager scenarios: states, owned shares with extra_count, leases, LRU eviction order."""

from __future__ import annotations

import threading

import pytest
import torch

from gpukv.l1 import MAX_READERS, L1Manager, Status
from l1_cases import LK, NF, NR, NW, OK, OOM, SIZE, WS, Clock, put


def make(num_slots: int = 4, **kwargs) -> L1Manager:
    return L1Manager(num_slots * 1024, **kwargs)


def test_status_and_max_readers():
    assert MAX_READERS == 128
    assert {s.name for s in Status} == {"OK", "NOT_FOUND", "NOT_READY", "NOT_WRITABLE",
                                        "WRONG_STATE", "LOCKED", "OUT_OF_MEMORY"}


# -- 1. reserve_read states ---------------------------------------------------------------------
def test_reserve_read_absent_writing_ready():
    l1 = make()
    assert l1.reserve_write(["w"], SIZE) == [OK]
    put(l1, ["r"])
    # A write is invisible: not `in`, not a prefix hit, NOT_READY to readers.
    assert "w" not in l1 and "r" in l1 and len(l1) == 1
    assert l1.prefix_hits(["r", "w"]) == 1 and l1.prefix_hits(["w", "r"]) == 0
    assert l1.reserve_read(["x", "w", "r"], 2, owner="req") == [NF, NR, OK]
    assert l1.read_count("r") == 3 and l1.held("r", "req") == 3 and l1.held("r") == 0
    assert l1.read_count("w") == 0 and l1.held("x", "req") == 0
    assert l1.stats()["read_locked"] == 1 and l1.stats()["writing"] == 1


def test_reserve_prefix_takes_the_prefix_ready_in_every_list_and_tops_up():
    l1 = make(8)
    put(l1, ["a0", "a1", "a2", "b0", "b1"])
    assert l1.reserve_write(["a3"], SIZE) == [OK]  # being written: ends rank a's prefix
    # two ranks' key lists: rank b holds 2 chunks, so 2 of each are taken, nothing past them
    assert l1.reserve_prefix([["a0", "a1", "a2", "a3"], ["b0", "b1", "b2", "b3"]], 1, owner="req") == 2
    assert [l1.held(k, "req") for k in ("a0", "a1", "a2", "a3", "b0", "b1")] == [2, 2, 0, 0, 2, 2]
    # a repeat tops up (takes nothing more), a larger count tops up to it
    assert l1.reserve_prefix([["a0", "a1"], ["b0", "b1"]], 1, owner="req") == 2
    assert l1.read_count("a0") == 2
    assert l1.reserve_prefix([["a0", "a1", "a2"]], 2, owner="req") == 3
    assert [l1.held(k, "req") for k in ("a0", "a1", "a2", "b0")] == [3, 3, 3, 2]
    # a miss at the head of any list takes nothing at all
    assert l1.reserve_prefix([["a0"], ["x"]], 0, owner="other") == 0
    assert l1.reserve_prefix([["a3", "a0"]], 0, owner="other") == 0
    assert l1.held("a0", "other") == 0 and l1._holds.entries_of("other") == []
    assert l1.stats()["owners"] == 1  # req only: no empty lease record left for "other"
    assert l1.finish_read(["a0", "a1", "a2"], 2, owner="req") == [OK] * 3
    assert l1.finish_read(["b0", "b1"], 1, owner="req") == [OK] * 2
    assert l1.stats()["owners"] == 0 and l1.stats()["shares"] == 0
    with pytest.raises(ValueError, match="extra_count"):
        l1.reserve_prefix([["a0"]], MAX_READERS, owner="req")
    assert l1.read_count("a0") == 0


# -- 2. O(1) in the share count --------------------------------------------------------------------
def test_many_shares_are_one_record_per_key_and_owner():
    l1 = make()
    put(l1, ["k"])
    assert l1.reserve_read(["k"], 0, owner="a") == [OK]
    assert l1.reserve_read(["k"], MAX_READERS - 2, owner="a") == [OK]  # 127 more shares
    assert l1._objects.get("k").shares == {"a": MAX_READERS}  # one int, not 128 records
    assert [e.key for e in l1._holds.entries_of("a")] == ["k"] and l1.read_count("k") == 128
    assert l1.stats()["leases"] == 1
    assert l1.finish_read(["k"], MAX_READERS - 1, owner="a") == [OK]
    assert l1._objects.get("k").shares == {} and l1.stats()["owners"] == 0 and l1.is_evictable("k")


# -- 3. extra_count validation and MAX_READERS per owner ---------------------------------------------
@pytest.mark.parametrize("extra", [-1, MAX_READERS, 1000])
def test_extra_count_out_of_range_raises_and_changes_nothing(extra):
    l1 = make()
    put(l1, ["k"])
    assert l1.reserve_read(["k"], owner="a") == [OK]
    for call in (l1.reserve_read, l1.finish_read, l1.finish_write_and_reserve_read):
        with pytest.raises(ValueError, match=str(extra)):
            call(["k"], extra, owner="a")
    with pytest.raises(TypeError):
        l1.reserve_read(["k"], 1.5, owner="a")
    assert l1.read_count("k") == 1 and l1.held("k", "a") == 1


def test_owner_cannot_exceed_max_readers_but_another_owner_can_take_more():
    l1 = make()
    put(l1, ["k", "j"])
    assert l1.reserve_read(["k"], MAX_READERS - 1, owner="a") == [OK]
    assert l1.reserve_read(["k", "j"], 0, owner="a") == [WS, OK]  # the full key only
    assert l1.held("k", "a") == MAX_READERS and l1.held("j", "a") == 1
    assert l1.reserve_read(["k"], 3, owner="b") == [OK]
    assert l1.read_count("k") == MAX_READERS + 4


# -- 4. finish_read releases only the owner's own shares ---------------------------------------------
def test_finish_read_releases_owned_shares_and_refuses_stealing():
    l1 = make()
    put(l1, ["k"])
    assert l1.reserve_read(["k"], 3, owner="a") == [OK]  # a: 4
    assert l1.reserve_read(["k"], 0, owner="b") == [OK]  # b: 1
    assert l1.finish_read(["k"], 1, owner="b") == [WS]  # b holds only 1
    assert l1.finish_read(["k"], 0, owner="c") == [WS]  # c holds none
    assert l1.finish_read(["k", "x"], 1, owner="a") == [OK, NF]
    assert (l1.held("k", "a"), l1.held("k", "b"), l1.read_count("k")) == (2, 1, 3)
    assert l1.finish_read(["k"], 2, owner="a") == [WS]
    assert l1.finish_read(["k"], 1, owner="a") == [OK]
    assert l1.finish_read(["k"], owner="a") == [WS]  # nothing left, count never goes below zero
    assert l1.read_count("k") == 1 and not l1.is_evictable("k")
    assert l1.finish_read(["k"], owner="b") == [OK]
    assert l1.read_count("k") == 0 and l1.is_evictable("k")


def test_finish_read_of_an_object_being_written_is_wrong_state():
    l1 = make()
    assert l1.reserve_write(["w"], SIZE) == [OK]
    assert l1.finish_read(["w"]) == [WS]


# -- 5. temporary objects ----------------------------------------------------------------------------
def test_temporary_object_freed_by_the_last_finish_read():
    l1 = make()
    assert l1.reserve_write(["t"], SIZE, temporary=True, owner="req") == [OK]
    assert l1.finish_write_and_reserve_read(["t"], 3, owner="req") == [OK]
    assert l1.finish_read(["t"], 1, owner="req") == [OK]
    assert "t" in l1 and l1.read_count("t") == 2 and l1.used_bytes == 1024
    assert l1.finish_read(["t"], 1, owner="req") == [OK]
    assert "t" not in l1 and l1.used_bytes == 0 and len(l1) == 0


def test_temporary_object_finished_without_readers_is_freed_at_once():
    l1 = make(1)
    assert l1.reserve_write(["t"], SIZE, temporary=True) == [OK]
    assert l1.finish_write(["t"]) == [OK]
    assert "t" not in l1 and l1.used_bytes == 0 and l1.stats()["evictions"] == 0


# -- 6. reserve_write ---------------------------------------------------------------------------------
def test_reserve_write_refuses_existing_keys_in_every_state():
    l1 = make(8)
    put(l1, ["ready", "locked"])
    assert l1.reserve_read(["locked"]) == [OK]
    assert l1.reserve_write(["writing"], SIZE) == [OK]
    assert l1.reserve_write(["tmp"], SIZE, temporary=True) == [OK]
    assert l1.reserve_write(["ready", "locked", "writing", "tmp", "new", "new"], SIZE) == [NW] * 4 + [OK, NW]
    assert l1.used_bytes == 5 * 1024


def test_reserve_write_evicts_then_rest_of_batch_out_of_memory():
    l1 = make(3)
    put(l1, ["a"])
    assert l1.reserve_read(["a"]) == [OK]  # a locked, cannot be evicted
    assert l1.reserve_write(["b", "c", "d", "e"], SIZE) == [OK, OK, OOM, OOM]
    assert l1.stats()["evictions"] == 0  # writes are never evicted either
    assert l1.reserve_write(["f"], SIZE) == [OOM]


def test_reserve_write_bad_nbytes_raises_and_too_big_is_out_of_memory():
    l1 = make(2)
    put(l1, ["a"])
    for bad in (0, -5, 1.5):
        with pytest.raises(ValueError, match=str(bad)):
            l1.reserve_write(["x"], bad)
    assert l1.reserve_write(["huge", "small"], 3 * 1024) == [OOM, OOM]
    assert "a" in l1 and l1.stats()["evictions"] == 0  # nothing evicted for a hopeless write


# -- 7. finish_write / abort_write ---------------------------------------------------------------------
def test_finish_write_states_and_write_ownership():
    l1 = make()
    assert l1.reserve_write(["k", "j"], SIZE, owner="w1") == [OK, OK]
    assert l1.finish_write(["k"], owner="w2") == [WS]  # another owner's write
    assert l1.abort_write(["k"]) == [WS]  # the anonymous owner is another owner too
    assert l1.finish_write_and_reserve_read(["k"], owner="w2") == [WS]
    assert "k" not in l1
    assert l1.finish_write(["k", "x"], owner="w1") == [OK, NF]
    assert "k" in l1 and l1.is_evictable("k")
    assert l1.finish_write(["k"], owner="w1") == [WS]
    assert l1.abort_write(["k", "x"], owner="w1") == [WS, NF]
    assert l1.abort_write(["j"], owner="w1") == [OK]
    assert l1.nbytes("k") == SIZE and l1.used_bytes == 1024 and l1.stats()["objects"] == 1
    with pytest.raises(KeyError, match="'j'"):
        l1.nbytes("j")


# -- 8. finish_write_and_reserve_read ------------------------------------------------------------------
def test_finish_write_and_reserve_read_is_one_step():
    l1 = make(2)
    assert l1.reserve_write(["t"], SIZE, temporary=True, owner="req") == [OK]
    assert l1.finish_write_and_reserve_read(["t", "x"], 3, owner="req") == [OK, NF]
    assert l1.read_count("t") == 4 and l1.held("t", "req") == 4 and not l1.is_evictable("t")
    assert l1.finish_write_and_reserve_read(["t"], owner="req") == [WS]
    # The locked object survives a write that needs every slot.
    assert l1.reserve_write(["a", "b"], SIZE) == [OK, OOM]
    assert "t" in l1
    assert l1.finish_read(["t"], 3, owner="req") == [OK]
    assert "t" not in l1  # temporary, last share gone


# -- 9. delete ----------------------------------------------------------------------------------------
def test_delete_states_and_force():
    l1 = make()
    put(l1, ["ready", "locked"])
    assert l1.reserve_read(["locked"], 2, owner="a") == [OK]
    assert l1.reserve_write(["writing"], SIZE, owner="w") == [OK]
    assert l1.delete(["x", "ready", "locked", "writing"]) == [NF, OK, LK, LK]
    assert l1.used_bytes == 2 * 1024
    assert l1.delete(["locked", "writing"], force=True) == [OK, OK]
    # the discarded write's slot stays out of circulation until its writer lets go of it
    assert l1.used_bytes == 1024 and l1.stats()["objects"] == 0 and "writing" not in l1
    assert l1.stats()["deferred_frees"] == 1
    assert l1.finish_write(["writing"], owner="w") == [NF]
    assert l1.used_bytes == 0
    assert l1.release_owner("a") == 0 and l1.release_owner("w") == 0  # nothing left behind
    assert l1.stats()["leases"] == 0 and l1.stats()["owners"] == 0


def test_clear_deletes_ready_unlocked_only():
    l1 = make(8)
    put(l1, ["a", "b", "c"])
    assert l1.reserve_read(["b"]) == [OK]
    assert l1.reserve_write(["w"], SIZE) == [OK]
    assert l1.clear() == 2
    assert ("a" in l1, "b" in l1, "c" in l1, l1.stats()["writing"]) == (False, True, False, 1)
    assert l1.stats()["evictions"] == 0


# -- 10. LRU eviction order -------------------------------------------------------------------------
def test_eviction_is_lru_and_reads_refresh_recency():
    l1 = make(4)
    put(l1, ["a", "b", "c", "d"])  # LRU order a b c d
    assert l1.reserve_read(["a"]) == [OK]
    assert l1.finish_read(["a"]) == [OK]  # a refreshed: b c d a
    assert l1.reserve_read(["c"], owner="r") == [OK]  # c locked: b d a
    assert l1.reserve_write(["e", "f"], SIZE) == [OK, OK]
    assert [k for k in "abcd" if k in l1] == ["a", "c"]  # b then d went
    assert l1.reserve_write(["g"], SIZE) == [OK]  # a goes; c locked, e f being written
    assert [k for k in "abcdefg" if k in l1] == ["c"] and l1.stats()["evictions"] == 3
    assert l1.reserve_write(["h"], SIZE) == [OOM]
    assert l1.finish_write(["e", "f", "g"]) == [OK, OK, OK]
    assert l1.finish_read(["c"], owner="r") == [OK]  # c now most recent: e f g c
    assert l1.reserve_write(["h", "i"], SIZE) == [OK, OK]
    assert [k for k in "cefg" if k in l1] == ["c", "g"]


def test_lru_skips_objects_that_became_busy_and_takes_them_back_once_idle():
    # Taking a share or a pin leaves an object where it is in the LRU (no work per key on the
    # lookup path); eviction skips and drops busy ones, and the last release queues them again.
    l1 = make(3)
    put(l1, ["a", "b", "c"])  # LRU order a b c
    assert l1.reserve_read(["a"], owner="r") == [OK]
    _, (pin,) = l1.pin(["b"])
    assert l1.reserve_write(["d"], SIZE) == [OK]  # a (shared) and b (pinned) skipped: c goes
    assert [k for k in "abc" if k in l1] == ["a", "b"] and l1.clear() == 0
    assert l1.finish_read(["a"], owner="r") == [OK]
    l1.unpin([pin])
    assert l1.finish_write(["d"]) == [OK]  # LRU order a b d
    assert l1.reserve_write(["e"], SIZE) == [OK]
    assert [k for k in "abd" if k in l1] == ["b", "d"] and l1.stats()["evictions"] == 2


def test_prefix_hits_and_contains_do_not_touch_recency():
    l1 = make(2)
    put(l1, ["a", "b"])
    assert l1.prefix_hits(["a", "b", "c"]) == 2 and "a" in l1
    assert l1.reserve_write(["c"], SIZE) == [OK]
    assert "a" not in l1 and "b" in l1


def test_eviction_prefers_same_class_then_empties_an_old_whole_slab():
    # Slabs of 2 KiB: two 1 KiB slots, or one 2 KiB slot. Arena = 3 slabs.
    l1 = L1Manager(6 * 1024, slab_bytes=2048)
    put(l1, ["a1", "a2", "a3", "a4"])  # slabs S0 = a1 a2, S1 = a3 a4
    assert l1.reserve_write(["B1"], 2000) == [OK]  # slab S2
    assert l1.finish_write(["B1"]) == [OK]
    # Same class first: a 1 KiB write evicts a1 (LRU of its class), not B1.
    assert l1.reserve_write(["a5"], SIZE) == [OK]
    assert [k for k in ("a1", "B1") if k in l1] == ["B1"]
    assert l1.finish_write(["a5"]) == [OK]
    assert l1.reserve_read(["a2"]) == [OK] and l1.finish_read(["a2"]) == [OK]  # S0 = a5 a2 newest
    # No free 2 KiB slot and no evictable 2 KiB object: B1 is locked. The slab whose newest
    # object is oldest is emptied whole: S1 (a3, a4), leaving S0 untouched.
    assert l1.reserve_read(["B1"]) == [OK]
    assert l1.reserve_write(["B2"], 2000) == [OK]
    assert [k for k in ("a2", "a3", "a4", "a5", "B1") if k in l1] == ["a2", "a5", "B1"]
    assert l1.stats()["evictions"] == 3 and l1.stats()["slabs_in_use"] == 3


# -- 11. leases, expire, release_owner --------------------------------------------------------------
def test_expire_releases_exactly_the_expired_owners_shares():
    clock = Clock()
    l1 = make(4, clock=clock, read_lease_s=10.0, write_lease_s=20.0)
    put(l1, ["k", "j"])
    assert l1.reserve_read(["j", "k"], 2, owner="a") == [OK, OK]  # a: deadline 10
    assert l1.reserve_write(["t"], SIZE, temporary=True, owner="a") == [OK]
    assert l1.finish_write_and_reserve_read(["t"], 1, owner="a") == [OK]  # a: deadline 10
    clock.now = 5.0
    assert l1.reserve_read(["k"], 0, owner="b") == [OK]  # b: deadline 15
    assert l1.reserve_read(["j"], 0, owner="a") == [OK]  # a's oldest lease refreshed to 15
    clock.now = 9.9
    assert l1.expire() == 0
    clock.now = 10.0
    assert l1.expire() == 3 + 2  # a on k and a on t, behind the refreshed j
    assert (l1.held("k", "a"), l1.held("k", "b"), l1.held("j", "a")) == (0, 1, 4)
    assert "t" not in l1  # temporary freed at zero readers
    clock.now = 15.0
    assert l1.expire() == 5
    assert l1.read_count("k") == 0 and l1.read_count("j") == 0
    assert l1.is_evictable("k") and l1.is_evictable("j") and l1.stats()["leases"] == 0


def test_expired_write_is_discarded_and_never_readable():
    clock = Clock()
    l1 = make(4, clock=clock, write_lease_s=20.0)
    assert l1.reserve_write(["w1"], SIZE, owner="slow") == [OK]
    clock.now = 10.0
    assert l1.reserve_write(["w2"], SIZE, owner="slow") == [OK]
    clock.now = 20.0
    assert l1.expire() == 0  # no shares, but w1 is discarded
    assert l1.finish_write(["w1", "w2"], owner="slow") == [NF, OK]
    assert "w1" not in l1 and l1.reserve_read(["w1"]) == [NF] and l1.used_bytes == 1024
    clock.now = 100.0
    assert l1.expire() == 0 and "w2" in l1  # finished writes carry no write lease


def test_release_owner_drops_its_shares_and_writes_only():
    l1 = make(8)
    put(l1, ["k", "j"])
    assert l1.reserve_read(["k", "j"], 6, owner="req1") == [OK, OK]
    assert l1.reserve_read(["k"], 0, owner="req2") == [OK]
    assert l1.reserve_write(["t"], SIZE, temporary=True, owner="req1") == [OK]
    assert l1.finish_write_and_reserve_read(["t"], 0, owner="req1") == [OK]
    assert l1.reserve_write(["w"], SIZE, owner="req1") == [OK]
    assert l1.reserve_write(["v"], SIZE, owner="req2") == [OK]
    assert l1.release_owner("req1") == 7 + 7 + 1
    assert (l1.read_count("k"), l1.read_count("j"), l1.held("k", "req2")) == (1, 0, 1)
    assert "t" not in l1 and l1.stats()["writing"] == 1 and l1.nbytes("v") == SIZE
    assert l1.finish_write(["w"], owner="req1") == [NF]
    assert l1.release_owner("req1") == 0 and l1.release_owner("nobody") == 0
    assert l1.used_bytes == 3 * 1024


# -- buffers and locate -------------------------------------------------------------------------------
def test_buffer_and_locate_are_views_into_the_arena():
    l1 = make(4)
    assert l1.reserve_write(["a", "b"], SIZE) == [OK, OK]
    arena, offsets = l1.locate(["b", "a"])
    assert offsets.dtype == torch.int64 and offsets.device.type == "cpu"
    assert offsets.tolist() == [1024, 0] and arena.shape == (4 * 1024,) and arena.dtype == torch.uint8
    buf = l1.buffer("b")
    assert buf.shape == (SIZE,) and buf.data_ptr() == arena.data_ptr() + 1024
    buf.fill_(7)
    assert l1.finish_write(["a", "b"]) == [OK, OK]
    with pytest.raises(ValueError, match="'b'"):
        l1.buffer("b")  # ready but unlocked: it could be evicted under the reader
    assert l1.reserve_read(["b"]) == [OK]
    assert torch.equal(l1.buffer("b"), torch.full((SIZE,), 7, dtype=torch.uint8))
    assert l1.locate(["a"])[1].tolist() == [0]
    with pytest.raises(KeyError, match="'zz'"):
        l1.locate(["a", "zz"])
    with pytest.raises(KeyError, match="'zz'"):
        l1.buffer("zz")


def test_keys_are_any_hashable_and_stats_add_up():
    l1 = make(8)
    keys = [("model", 0, b"\x01"), 42, frozenset({1})]
    put(l1, keys)
    assert l1.reserve_read(keys[:1], 1) == [OK]
    assert l1.reserve_write(["w"], 300) == [OK]
    stats = l1.stats()
    assert stats.pop("devices") == [dict(used_bytes=3 * 1024 + 512, capacity_bytes=8 * 1024,
                                         objects=4, read_locked=1, shares=2, evictions=0)]
    assert stats == {"objects": 4, "ready": 3, "writing": 1, "read_locked": 1, "pinned": 0,
                     "shares": 2, "used_bytes": 3 * 1024 + 512, "capacity_bytes": 8 * 1024,
                     "evictions": 0, "expired_shares": 0, "expired_writes": 0,
                     "deferred_frees": 0, "slabs_in_use": 4, "leases": 1, "owners": 1}


# -- 12. threads ---------------------------------------------------------------------------------------
def test_threads_hammering_shared_keys_end_with_exact_counts():
    l1 = make(64)
    keys = [f"k{i}" for i in range(16)]
    put(l1, keys)
    assert l1.reserve_read(keys, owner="pin") == [OK] * len(keys)  # keep them from the writer
    rounds, owners = 60, ["t0", "t1", "t2", None]
    barrier, failures = threading.Barrier(len(owners) + 1), []

    def reader(owner):
        barrier.wait()
        for _ in range(rounds):
            failures.append(l1.reserve_read(keys, 2, owner=owner) != [OK] * len(keys))
            failures.append(l1.finish_read(keys, 1, owner=owner) != [OK] * len(keys))  # net +1

    def writer():  # churns the other 48 slots through eviction meanwhile
        barrier.wait()
        for i in range(rounds * 4):
            failures.append(l1.reserve_write([f"w{i}"], SIZE) != [OK])
            failures.append(l1.finish_write([f"w{i}"]) != [OK])

    threads = [threading.Thread(target=reader, args=(o,)) for o in owners]
    threads.append(threading.Thread(target=writer))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(failures) == 2 * rounds * 8 and not any(failures)
    assert l1.release_owner("pin") == len(keys) and l1.stats()["evictions"] == rounds * 4 - 48
    assert all(l1.read_count(k) == rounds * len(owners) for k in keys)
    assert all(l1.held(k, o) == rounds for k in keys for o in owners)
    assert all(k in l1 for k in keys)  # read-locked keys survived the writer's evictions
    assert sum(l1.release_owner(o) for o in owners) == rounds * len(owners) * len(keys)


# -- sizes and shared budget ----------------------------------------------------------------------
def test_capacity_of_exactly_k_objects_holds_k():
    l1 = L1Manager(3 * 1024)
    assert l1.reserve_write(["a", "b", "c"], SIZE) == [OK, OK, OK]
    assert l1.finish_write(["a", "b", "c"]) == [OK, OK, OK]
    assert l1.used_bytes == l1.capacity_bytes == 3 * 1024 and len(l1) == 3
    assert l1.stats()["evictions"] == 0
    assert l1.reserve_write(["d"], SIZE) == [OK]  # the 4th evicts the LRU one
    assert "a" not in l1 and l1.stats()["evictions"] == 1


def test_two_object_sizes_share_one_budget_without_eviction_when_one_class_empties():
    l1 = L1Manager(8 * 1024, slab_bytes=2048)
    put(l1, [f"small{i}" for i in range(8)])
    assert l1.delete([f"small{i}" for i in range(8)]) == [OK] * 8
    assert l1.stats()["slabs_in_use"] == 0 and l1.used_bytes == 0
    assert l1.reserve_write(["big0", "big1"], 4000) == [OK, OK]  # 4 KiB slots reuse the bytes
    assert l1.stats()["evictions"] == 0 and l1.used_bytes == 8 * 1024


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_arena_scenario():
    l1 = L1Manager(4 * 1024, device="cuda")
    assert l1.reserve_write(["a"], SIZE) == [OK]
    arena, offsets = l1.locate(["a"])
    assert arena.device.type == "cuda" and offsets.device.type == "cpu"
    l1.buffer("a").fill_(3)
    assert l1.finish_write_and_reserve_read(["a"], 1) == [OK]
    assert int(l1.buffer("a").sum()) == 3 * SIZE
    assert l1.finish_read(["a"], 1) == [OK] and l1.is_evictable("a")
