"""HoldBook scenarios: owned reader shares with leases, copy pins, and what happens when an
object's last hold goes (made the most recent idle object, or handed back to be settled)."""

from __future__ import annotations

from collections import OrderedDict

import pytest

from gpukv.constants import MAX_READERS
from gpukv.l1.entry import Entry, Status
from gpukv.l1.holds import HoldBook

OK, NF, NR, WS = Status.OK, Status.NOT_FOUND, Status.NOT_READY, Status.WRONG_STATE


def ready(keys, lru: OrderedDict, temporary: bool = False) -> dict:
    """Ready objects, unpinned (their write pin released), by key."""
    objs = {}
    for key in keys:
        entry = objs[key] = Entry(key, 0, 1000, 1024, 0, temporary, None, 0.0, lru)
        entry.ready, entry.pins = True, 0
    return objs


class Table:
    """What the hold book asks of the object table: ready objects by key, and why one is not."""

    def __init__(self, objs: dict, writing=()) -> None:
        self.get_ready, self.writing = objs.get, set(writing)

    def unreadable(self, key) -> Status:
        return NR if key in self.writing else NF


def take(book: HoldBook, objs: dict, keys, owner, count, deadline, top_up=False):
    return book.take(keys, Table(objs), owner, count, deadline, top_up)


def test_shares_are_one_count_per_owner_and_object_capped_at_max_readers():
    book, lru = HoldBook(), OrderedDict()
    objs = ready("ab", lru)
    assert take(book, objs, ["a", "x", "b"], "r", 3, 10.0) == [OK, NF, OK]
    assert take(book, objs, ["a"], "r", 2, 11.0) == [OK]  # adds
    assert objs["a"].shares == {"r": 5} and objs["b"].shares == {"r": 3}
    assert take(book, objs, ["a"], "r", MAX_READERS - 4, 12.0) == [WS]  # 5 + 124 > 128: refused
    assert objs["a"].shares == {"r": 5} and book.deadline_of(objs["a"], "r") == 11.0
    assert take(book, objs, ["a", "b"], "r", 4, 13.0, top_up=True) == [OK, OK]  # up to 4 only
    assert (objs["a"].shares, objs["b"].shares) == ({"r": 5}, {"r": 4})
    assert take(book, objs, ["a"], "s", MAX_READERS, 14.0) == [OK]  # another owner: its own cap
    assert objs["a"].readers == 5 + MAX_READERS and objs["a"].shares["s"] == MAX_READERS
    assert (book.num_leases, book.num_owners) == (3, 2)


def test_a_lease_is_refreshed_by_the_owners_latest_take_and_kept_in_deadline_order():
    book, lru = HoldBook(), OrderedDict()
    objs = ready("abc", lru)
    take(book, objs, "abc", "r", 1, 10.0)
    take(book, objs, "a", "r", 1, 20.0, top_up=True)  # takes nothing, refreshes a's lease
    assert [e.key for e in book.entries_of("r")] == ["b", "c", "a"]
    assert book.expire(10.0) == (2, [])  # b and c: made idle (most recent last), nothing to settle
    assert list(lru) == [objs["b"], objs["c"]] and (objs["b"].stamp, objs["c"].stamp) == (1, 2)
    assert objs["a"].shares == {"r": 1} and book.num_leases == 1
    assert book.expire(19.9) == (0, []) and book.expire(20.0) == (1, [])
    assert list(lru) == [objs["b"], objs["c"], objs["a"]] and book.num_owners == 0


def test_release_takes_back_only_what_the_owner_holds_and_touches_the_objects_it_idles():
    book, lru = HoldBook(), OrderedDict()
    objs = ready("abc", lru)
    take(book, objs, "abc", "r", 2, 10.0)
    take(book, objs, "b", "s", 1, 10.0)
    objs["c"].pins = 1  # a copy is reading c
    out, settle = book.release(["a", "b", "c", "x"], objs.get, "r", 3)
    assert out == [WS, WS, WS, NF] and settle == [] and book.num_leases == 4  # nothing changed
    out, settle = book.release(["c", "b", "a"], objs.get, "r", 2)
    assert out == [OK, OK, OK] and settle == []
    # a lost its last hold and became the most recent idle object; b is still s's, c is pinned
    assert list(lru) == [objs["a"]] and objs["a"].stamp == 1 and objs["b"].shares == {"s": 1}
    assert (objs["c"].shares, objs["c"].stamp) == ({}, 0)
    assert book.release(["a"], objs.get, "r", 1) == ([WS], [])  # never below zero


def test_a_temporary_object_whose_last_share_goes_is_handed_back_to_be_settled():
    book, lru = HoldBook(), OrderedDict()
    objs = ready("t", lru, temporary=True)
    book.give(objs["t"], "req", 2, 10.0)  # a tier hit, loaded with its reader's shares
    assert book.release(["t"], objs.get, "req", 1) == ([OK], [])
    assert book.release(["t"], objs.get, "req", 1) == ([OK], [objs["t"]])
    assert list(lru) == [] and book.num_owners == 0


def test_top_up_rows_and_release_owner_of_some_or_all_objects():
    book, lru = HoldBook(), OrderedDict()
    objs = ready("abcd", lru)
    objs["t"] = ready("t", lru, temporary=True)["t"]
    take(book, objs, "ab", "r", 3, 10.0)
    book.top_up([[objs["a"], objs["b"]], [objs["c"], objs["t"]]], "r", 2, 20.0)
    assert [objs[k].shares["r"] for k in "abct"] == [3, 3, 2, 2]
    assert [e.key for e in book.entries_of("r")] == ["a", "b", "c", "t"]  # all refreshed, in order
    # some: each object once, None (a missing key) and objects r does not hold are skipped
    assert book.release_owner("r", [objs["a"], objs["a"], None, objs["d"]]) == (3, [])
    assert list(lru) == [objs["a"]] and [e.key for e in book.entries_of("r")] == ["b", "c", "t"]
    objs["b"].pins = 1
    assert book.release_owner("r") == (3 + 2 + 2, [objs["t"]])  # b stays pinned: not touched
    assert list(lru) == [objs["a"], objs["c"]] and book.num_owners == 0
    assert book.release_owner("r") == (0, []) and book.release_owner("nobody", [objs["a"]]) == (0, [])


def test_pins_count_copies_and_the_last_unpin_touches_or_hands_back():
    book, lru = HoldBook(), OrderedDict()
    objs = ready("ab", lru)
    writing = Entry("w", 0, 1000, 1024, 0, False, None, 0.0, lru)  # holds its write pin
    statuses, handles = book.pin(["a", "a", "x", "w", "b"], Table(objs, writing=["w"]))
    assert statuses == [OK, OK, NF, NR, OK]
    assert handles == [objs["a"], objs["a"], None, None, objs["b"]]
    assert book.pin_handles([writing, objs["b"]]) == [NR, OK] and objs["b"].pins == 2
    assert book.unpin([objs["a"], objs["b"]]) == (0, [])  # both still pinned once
    assert book.unpin([objs["b"], objs["a"]]) == (0, [])
    assert list(lru) == [objs["b"], objs["a"]]  # in the order they went idle
    objs["b"].doomed = True  # (the object table's flag) discarded meanwhile
    assert book.pin_handles([objs["b"]]) == [NF] and objs["b"].pins == 0
    with pytest.raises(AssertionError):
        book.unpin([objs["a"]])  # never below zero


def test_end_read_releases_one_share_where_held_then_unpins():
    book, lru = HoldBook(), OrderedDict()
    objs = ready("abc", lru)
    take(book, objs, "a", "req", 2, 10.0)  # two ranks will read a
    take(book, objs, "b", "req", 1, 10.0)
    _, pins = book.pin("abc", Table(objs))
    assert book.unpin(pins, "req", one_share=True) == (2, [])  # a: 2 -> 1 share, b: 1 -> 0, c: none
    assert list(lru) == [objs["b"], objs["c"]] and objs["a"].shares == {"req": 1}
    _, pins = book.pin("a", Table(objs))
    assert book.unpin(pins, "other", one_share=True) == (0, [])  # other holds nothing: pin only
    assert objs["a"].shares == {"req": 1} and list(lru) == [objs["b"], objs["c"]]


def test_discard_drops_every_share_and_defers_the_free_while_pinned():
    book, lru = HoldBook(), OrderedDict()
    objs = ready("ab", lru)
    take(book, objs, "ab", "r", 2, 10.0)
    take(book, objs, "a", "s", 1, 10.0)
    assert book.discard(objs["b"]) is False  # unpinned: the caller frees it now
    objs["a"].pins = 1
    assert book.discard(objs["a"]) is True and book.deferred_frees == 1
    assert objs["a"].shares == {} and (book.num_leases, book.num_owners) == (0, 0)
    objs["a"].doomed = True
    assert book.unpin([objs["a"]]) == (0, [objs["a"]])  # its last unpin hands it back: free it
    assert list(lru) == []


def test_unpin_one_is_the_write_pins_release():
    book, lru = HoldBook(), OrderedDict()
    new, tmp, gone = (Entry(k, 0, 1000, 1024, 0, k == "t", None, 0.0, lru) for k in "ntg")
    for entry in (new, tmp, gone):
        entry.ready = entry is not gone
    gone.doomed = True
    book.give(tmp, "req", 1, 10.0)  # a tier hit finished with its reader's share
    assert [book.unpin_one(e) for e in (new, tmp, gone)] == [False, False, True]
    assert list(lru) == [new] and new.stamp == book.stamp == 1 and tmp.pins == gone.pins == 0
