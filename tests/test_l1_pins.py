"""L1 pins, idempotent top-up, range release and several device arenas.

A copy pins the object it moves; release-by-owner, lease expiry, force deletes and eviction never
free or hand out a pinned slot (the object is discarded, its slot freed by the last unpin).
"""

from __future__ import annotations

import threading

import pytest
import torch

from gpukv.l1 import MAX_READERS, L1Manager, Status
from gpukv.l1.slab import SlabArena
from l1_cases import LK, NF, NR, OK, OOM, SIZE, WS, Clock, put


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


def test_a_discarded_write_is_released_by_key_even_after_its_key_was_stored_again():
    clock = Clock()
    l1 = L1Manager(4 * 1024, write_lease_s=10, clock=clock)
    assert l1.reserve_write(["k", "j"], SIZE, owner="slow") == [OK, OK]
    clock.now = 11
    assert l1.expire() == 0 and l1.used_bytes == 2048  # both discarded, both still pinned
    put(l1, ["k"], owner="fast")  # k stored again and ready
    assert l1.reserve_write(["j"], SIZE, owner="other") == [OK]  # j being written again
    # the slow writer's pack ends: its discarded writes answer NOT_FOUND and let go of their
    # slots (before, WRONG_STATE kept both slots out of circulation for good)
    assert l1.finish_write(["k"], owner="slow") == [NF]
    assert l1.abort_write(["j"], owner="slow") == [NF]
    assert l1.used_bytes == 2048 and "k" in l1 and l1.pin_count("j") == 1
    assert l1.finish_write(["k", "j"], owner="slow") == [WS, WS]  # nothing left to release
    assert l1.finish_write(["j"], owner="other") == [OK] and l1.used_bytes == 2048


def test_release_owner_of_a_range_naming_a_key_twice():
    l1 = L1Manager(4 * 1024)
    put(l1, ["a", "b"])
    assert l1.reserve_read(["a", "b"], 1, owner="req") == [OK, OK]
    assert l1.release_owner("req", ["a", "a", "b"]) == 4
    assert l1.read_count("a") == l1.read_count("b") == 0 and l1.stats()["leases"] == 0


def _pattern(serial: int, nbytes: int = SIZE) -> torch.Tensor:
    return ((torch.arange(nbytes) * 3 + 17 * serial + 5) % 251).to(torch.uint8)


def test_release_expire_and_eviction_under_copies_never_touch_a_pinned_slot():
    """Copies (5 stores, 7 reads, each pinning one slot) write their own byte pattern into their
    slot: half before, half while a releaser (release_owner, range release, force deletes,
    expire) and an evictor (fills both arenas, writing its own pattern into each new slot) run
    concurrently. Every pinned object is discarded or unlocked meanwhile, none is evictable, so
    the evictions, frees and counts below are exact whatever the interleaving."""
    clock = Clock()
    l1 = L1Manager(arenas=[SlabArena(16 * 1024), SlabArena(8 * 1024)], read_lease_s=10,
                   write_lease_s=30, clock=clock)
    put(l1, ["r0", "r1", "r2", "r3", "r4", "f0", "f1"])
    put(l1, ["g0"], device=1)
    assert l1.reserve_write(["t"], SIZE, device=1, temporary=True, owner="loader") == [OK]
    assert l1.finish_write(["t"], owner="loader", extra_count=1, reader="reqT") == [OK]
    for i in range(5):
        assert l1.reserve_read([f"r{i}"], 1, owner=f"req{i}") == [OK]
    assert l1.reserve_read(["g0"], 1, owner="reqG") == [OK]
    writes = [l1.reserve_write_slots([f"s{i}"], SIZE, owner=("inst", i))[1][0] for i in range(4)]
    clock.now = 12.0
    writes += l1.reserve_write_slots(["s4"], SIZE, owner=("inst", 4))[1]  # deadline 42
    reads = [(f"r{i}", f"req{i}") for i in range(5)] + [("g0", "reqG"), ("t", "reqT")]
    num_copies = len(writes) + len(reads)
    halfway = [threading.Event() for _ in range(num_copies)]
    chaos_done, failures, ends = threading.Event(), [], {}
    half = SIZE // 2

    def copy(i: int, handle, key=None, owner=None) -> None:
        try:
            if handle is None:  # a read: the copy pins its object itself
                statuses, (handle,) = l1.pin([key])
                assert statuses == [OK], (key, statuses)
            slot, pattern = l1.arena(handle.device)[handle.offset:handle.offset + SIZE], _pattern(i)
            slot[:half] = pattern[:half]
            halfway[i].set()
            slot[half:] = pattern[half:]  # while the releaser and the evictor run
            assert chaos_done.wait(30)
            assert torch.equal(slot, pattern), f"copy {i}: its pinned slot was handed out"
            ends[i] = (l1.finish_write([handle]) if owner is None
                       else l1.end_read([handle], owner=owner))
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    def releaser() -> None:
        assert sum(l1.release_owner(f"req{i}") for i in range(4)) == 8  # aborted requests
        assert l1.release_owner("reqT", ["t", "t"]) == 2  # a range naming t twice
        assert l1.release_owner(("inst", 0)) == 0  # unregister in the middle of s0's pack
        assert l1.delete(["s1", "r3"], force=True) == [OK, OK]
        assert l1.expire() == 2  # reqG's shares, and the writes s2 s3 (deadline 30)

    evicted_survivors = []

    def evictor() -> None:
        for device, keys in ((0, [f"e{i}" for i in range(8)]), (1, [f"x{i}" for i in range(8)])):
            for serial, key in enumerate(keys, start=100 + 10 * device):
                statuses, (handle,) = l1.reserve_write_slots([key], SIZE, device=device, owner="ev")
                assert statuses == [OK], (key, statuses)
                l1.arena(device)[handle.offset:handle.offset + SIZE] = _pattern(serial)
                assert l1.finish_write([handle]) == [OK]
                evicted_survivors.append((key, handle, serial))

    def chaos(fn) -> None:
        try:
            for event in halfway:
                assert event.wait(30)
            fn()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=copy, args=(i, h)) for i, h in enumerate(writes)]
    threads += [threading.Thread(target=copy, args=(len(writes) + j, None, key, owner))
                for j, (key, owner) in enumerate(reads)]
    clock.now = 35.0  # read leases from t=0 and writes from t=0 have passed; s4's has not
    assert l1.reserve_read(["r4"], 1, owner="req4", top_up=True) == [OK]  # lease refreshed only
    chaos_threads = [threading.Thread(target=chaos, args=(fn,)) for fn in (releaser, evictor)]
    for t in threads + chaos_threads:
        t.start()
    for t in chaos_threads:
        t.join()
    chaos_done.set()
    for t in threads:
        t.join()
    assert not failures, failures
    assert [ends[i] for i in range(5)] == [[NF]] * 4 + [[OK]]  # discarded writes never ready
    assert [ends[i] for i in range(5, num_copies)] == [0, 0, 0, 0, 1, 0, 0]
    stats = l1.stats()
    # device 0: 4 free slots, then f0 f1 and e0 e1 evicted; device 1: 6 free, then x0 x1
    assert [d["evictions"] for d in stats["devices"]] == [4, 2]
    live = {0: ["r0", "r1", "r2", "r4", "s4"] + [f"e{i}" for i in range(2, 8)],
            1: ["g0"] + [f"x{i}" for i in range(2, 8)]}
    assert [d["objects"] for d in stats["devices"]] == [len(live[0]), len(live[1])]
    assert all(k in l1 and l1.device_of(k) == d for d, keys in live.items() for k in keys)
    assert [d["used_bytes"] for d in stats["devices"]] == [1024 * len(live[0]), 1024 * len(live[1])]
    assert (stats["deferred_frees"], stats["expired_writes"], stats["expired_shares"]) == (5, 2, 2)
    assert (stats["shares"], stats["leases"], stats["pinned"], stats["writing"]) == (1, 1, 0, 0)
    assert l1.held("r4", "req4") == 1 and "t" not in l1 and "r3" not in l1
    for key, handle, serial in evicted_survivors:
        if key in l1:
            assert torch.equal(l1.arena(handle.device)[handle.offset:handle.offset + SIZE],
                               _pattern(serial)), key


def test_events_name_each_object_that_becomes_readable_or_stops_being_so():
    events = []
    l1 = L1Manager(2 * 1024, on_event=lambda ev, entry, reason: events.append((ev, entry.key, reason)))
    put(l1, ["a", "b"])
    assert l1.reserve_write(["c"], SIZE) == [OK]  # evicts a (the LRU)
    assert l1.abort_write(["c"]) == [OK]  # never readable: no event
    assert l1.reserve_write(["t"], SIZE, temporary=True, owner="loader") == [OK]
    assert l1.finish_write(["t"], owner="loader", extra_count=0, reader="req") == [OK]
    assert l1.finish_read(["t"], owner="req") == [OK]  # the temporary object's last reader
    assert l1.delete(["b"]) == [OK]
    put(l1, ["d"])
    assert l1.clear() == 1
    assert events == [("stored", "a", "new"), ("stored", "b", "new"), ("removed", "a", "evicted"),
                      ("stored", "t", "loaded"), ("removed", "t", "released"),
                      ("removed", "b", "deleted"), ("stored", "d", "new"),
                      ("removed", "d", "cleared")]
