"""L1 pins, idempotent top-up, range release and several device arenas.

A copy pins the object it moves; release-by-owner, lease expiry, force deletes and eviction never
free or hand out a pinned slot (the object is discarded, its slot freed by the last unpin).
"""

from __future__ import annotations

import pytest

from gpukv.l1 import MAX_READERS, L1Manager, Status
from gpukv.l1.slab import SlabArena

OK, NF, NR, WS, LK, OOM = (Status.OK, Status.NOT_FOUND, Status.NOT_READY, Status.WRONG_STATE,
                           Status.LOCKED, Status.OUT_OF_MEMORY)
SIZE = 1000  # one 1024-byte slot


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def put(l1: L1Manager, keys, **kwargs) -> None:
    assert l1.reserve_write(keys, SIZE, **kwargs) == [OK] * len(keys)
    assert l1.finish_write(keys, owner=kwargs.get("owner")) == [OK] * len(keys)


def test_a_pinned_object_survives_its_owner_release_and_write_pressure():
    l1 = L1Manager(3 * 1024)
    put(l1, ["k"])
    assert l1.reserve_read(["k"], 1, owner="req") == [OK]
    statuses, (pin,) = l1.pin(["k"])
    assert statuses == [OK] and l1.pin_count("k") == 1
    assert l1.release_owner("req") == 2  # a scheduler abort in the middle of the copy
    assert l1.read_count("k") == 0 and not l1.is_evictable("k")
    # a store that needs every slot gets OUT_OF_MEMORY rather than the pinned slot
    statuses, handles = l1.reserve_write_slots(["a", "b", "c"], SIZE)
    assert statuses == [OK, OK, OOM] and pin.offset not in {h.offset for h in handles if h}
    assert l1.stats()["evictions"] == 0
    l1.unpin([pin])
    assert l1.is_evictable("k")
    assert l1.abort_write(handles[:2]) == [OK, OK]
    assert l1.reserve_write(["c"], SIZE) == [OK] and "k" in l1  # a free slot, no eviction


def test_force_delete_of_a_pinned_object_defers_the_free_and_the_key_can_be_stored_again():
    l1 = L1Manager(2 * 1024)
    put(l1, ["k"])
    _, (pin,) = l1.pin(["k"])
    assert l1.delete(["k"]) == [LK]
    assert l1.delete(["k"], force=True) == [OK]
    assert "k" not in l1 and l1.used_bytes == 1024 and l1.stats()["deferred_frees"] == 1
    statuses, (fresh,) = l1.reserve_write_slots(["k"], SIZE)
    assert statuses == [OK] and fresh.offset != pin.offset  # never the pinned slot
    assert l1.reserve_write(["x"], SIZE) == [OOM]  # the old slot is still out of circulation
    l1.unpin([pin])
    assert l1.used_bytes == 1024 and l1.reserve_write(["x"], SIZE) == [OK]
    assert l1.finish_write([fresh]) == [OK] and "k" in l1


def test_an_expired_write_lease_keeps_the_slot_until_the_writer_lets_go():
    clock = Clock()
    l1 = L1Manager(2 * 1024, write_lease_s=10, clock=clock)
    statuses, (slow,) = l1.reserve_write_slots(["k"], SIZE, owner="w")
    clock.now = 11
    assert l1.expire() == 0 and l1.stats()["expired_writes"] == 1
    assert "k" not in l1 and l1.reserve_read(["k"]) == [NF]
    statuses, (other,) = l1.reserve_write_slots(["k"], SIZE, owner="w2")
    assert statuses == [OK] and other.offset != slow.offset
    assert l1.reserve_write(["x"], SIZE) == [OOM]  # the slow write still owns its slot
    assert l1.finish_write([slow]) == [NF]  # discarded: never becomes readable
    assert l1.finish_write([slow]) == [WS]  # and its pin is released once only
    assert l1.reserve_write(["x"], SIZE) == [OK]
    assert l1.finish_write([other]) == [OK] and "k" in l1


def test_release_owner_of_a_writer_discards_its_writes_but_not_under_the_copy():
    l1 = L1Manager(2 * 1024)
    _, (w,) = l1.reserve_write_slots(["k"], SIZE, owner=("inst", 1))
    assert l1.release_owner(("inst", 1)) == 0  # unregister during the pack
    assert "k" not in l1 and l1.used_bytes == 1024
    assert l1.abort_write([w]) == [NF] and l1.used_bytes == 0


def test_temporary_object_whose_shares_go_while_pinned_is_freed_by_the_unpin():
    l1 = L1Manager(2 * 1024)
    assert l1.reserve_write(["t"], SIZE, temporary=True, owner="loader") == [OK]
    assert l1.finish_write(["t"], owner="loader", extra_count=1, reader="req") == [OK]
    _, (pin,) = l1.pin(["t"])
    assert l1.release_owner("req") == 2
    assert "t" in l1 and l1.used_bytes == 1024
    l1.unpin([pin])
    assert "t" not in l1 and l1.used_bytes == 0


def test_end_read_releases_one_share_where_held_then_unpins():
    l1 = L1Manager(4 * 1024)
    put(l1, ["a", "b"])
    assert l1.reserve_read(["a"], 1, owner="req") == [OK]  # two ranks will read a
    _, pins = l1.pin(["a", "b"])  # b: read without a share of this request
    assert l1.end_read(pins, owner="req") == 1
    assert l1.held("a", "req") == 1 and l1.pin_count("a") == 0 and l1.is_evictable("b")
    _, pins = l1.pin(["a"])
    assert l1.end_read(pins, owner="req") == 1 and l1.is_evictable("a")


def test_top_up_takes_shares_up_to_the_target_only():
    l1 = L1Manager(4 * 1024)
    put(l1, ["a", "b"])
    for _ in range(16):  # a lookup hook called many times for one request
        assert l1.reserve_read(["a"], 7, owner="req", top_up=True) == [OK]
    assert l1.held("a", "req") == 8
    assert l1.finish_read(["a"], owner="req") == [OK]  # one rank retrieved
    assert l1.reserve_read(["a", "b"], 7, owner="req", top_up=True) == [OK, OK]
    assert (l1.held("a", "req"), l1.held("b", "req")) == (8, 8)
    assert l1.reserve_read(["a"], MAX_READERS - 1, owner="req", top_up=True) == [OK]
    assert l1.held("a", "req") == MAX_READERS
    assert l1.reserve_read(["a"], 0, owner="req") == [WS]  # adding past the cap is refused


def test_release_owner_of_some_keys_only():
    l1 = L1Manager(4 * 1024)
    put(l1, ["a", "b", "c"])
    assert l1.reserve_read(["a", "b", "c"], 1, owner="req") == [OK] * 3
    assert l1.release_owner("req", ["a", "b", "zz"]) == 4
    assert [l1.held(k, "req") for k in "abc"] == [0, 0, 2] and l1.is_evictable("a")


def test_pin_states_and_pin_handles():
    l1 = L1Manager(4 * 1024)
    put(l1, ["r"])
    statuses, handles = l1.reserve_write_slots(["w"], SIZE)
    assert l1.pin(["r", "w", "x"])[0] == [OK, NR, NF]
    assert l1.pin_handles(handles) == [NR]
    assert l1.finish_write(handles) == [OK]
    assert l1.pin_handles(handles) == [OK] and l1.pin_count("w") == 1
    assert l1.delete(["w"], force=True) == [OK]
    assert l1.pin_handles(handles) == [NF]  # discarded
    l1.unpin(handles)
    assert l1.used_bytes == 2048 - 1024  # w's slot is free, r's is used (plus r's pin)


def test_several_arenas_have_their_own_capacity_and_eviction_but_one_key_space():
    l1 = L1Manager(arenas=[SlabArena(2 * 1024), SlabArena(2 * 1024)])
    assert l1.num_devices == 2
    assert l1.reserve_write(["a", "b"], SIZE, device=0) == [OK, OK]
    assert l1.finish_write(["a", "b"]) == [OK, OK]
    assert l1.reserve_write(["a"], SIZE, device=1) == [Status.NOT_WRITABLE]  # never twice
    assert l1.reserve_write(["c"], SIZE, device=1) == [OK]
    assert l1.finish_write(["c"]) == [OK]
    assert l1.stats()["evictions"] == 0 and [l1.device_of(k) for k in "abc"] == [0, 0, 1]
    assert l1.reserve_write(["d"], SIZE, device=1) == [OK] and l1.finish_write(["d"]) == [OK]
    assert l1.reserve_write(["e"], SIZE, device=1) == [OK]  # evicts c, on device 1 only
    assert "c" not in l1 and "a" in l1 and "b" in l1
    assert [d["evictions"] for d in l1.stats()["devices"]] == [0, 1]
    with pytest.raises(ValueError, match="device"):
        l1.reserve_write(["f"], SIZE, device=2)
    with pytest.raises(ValueError, match="several arenas|arenas"):
        l1.locate(["a", "d"])
