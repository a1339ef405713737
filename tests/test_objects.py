"""ObjectTable scenarios: one live object per key, the writing -> ready -> discarded states, the
ready lookups and prefixes the lookup path takes."""

from __future__ import annotations

import pytest

from gpukv.l1.entry import Entry, Status
from gpukv.l1.objects import ObjectTable


def write(table: ObjectTable, key, offset: int = 0) -> Entry:
    entry = Entry(key, 0, 1000, 1024, offset, False, "w", 10.0, None)
    table.add(key, entry)
    return entry


def test_a_write_is_live_but_not_ready_until_marked_and_never_after_discard():
    table = ObjectTable()
    a = write(table, "a")
    assert (table.get("a"), table.get_ready("a")) == (a, None)
    assert (table.is_live("a"), table.is_ready("a"), table.num_live, table.num_ready) == (True, False, 1, 0)
    assert table.unreadable("a") is Status.NOT_READY and table.unreadable("x") is Status.NOT_FOUND
    table.mark_ready(a)
    assert a.ready and table.get_ready("a") is a and (table.num_live, table.num_ready) == (1, 1)
    table.discard(a)
    assert a.doomed and a.ready  # the state a copy's handle still sees: discarded after ready
    assert (table.get("a"), table.get_ready("a"), table.num_live, table.num_ready) == (None, None, 0, 0)
    assert table.unreadable("a") is Status.NOT_FOUND


def test_a_discarded_key_can_be_written_afresh_and_the_old_object_stays_discarded():
    table = ObjectTable()
    old = write(table, "k", offset=0)
    table.discard(old)  # e.g. an expired write lease, its writer still copying
    new = write(table, "k", offset=1024)
    assert table.get("k") is new and old.doomed and not new.doomed
    table.mark_ready(new)
    assert table.get_ready("k") is new and [e.offset for e in table.values()] == [1024]
    with pytest.raises(AssertionError):
        table.discard(old)  # a discarded object is never taken out twice


def test_entry_names_the_missing_key_and_items_list_live_objects():
    table = ObjectTable()
    a, b = write(table, ("m", 0, b"\x01")), write(table, 42)
    table.mark_ready(b)
    assert table.entry(42) is b and dict(table.items()) == {("m", 0, b"\x01"): a, 42: b}
    with pytest.raises(KeyError, match="'zz'"):
        table.entry("zz")


def test_leading_ready_stops_at_the_first_key_not_ready():
    table = ObjectTable()
    for key in "abcd":
        write(table, key)
    for key in "abd":
        table.mark_ready(table.get(key))
    assert table.leading_ready("abcd") == 2  # c is being written
    assert table.leading_ready("xab") == 0 and table.leading_ready("") == 0
    assert table.leading_ready(["d", "a", "b"]) == 3


def test_ready_prefix_takes_the_prefix_ready_in_every_list():
    table = ObjectTable()
    for key in ["a0", "a1", "a2", "a3", "b0", "b1"]:
        write(table, key)
    for key in ["a0", "a1", "a2", "b0", "b1"]:  # a3 is still being written
        table.mark_ready(table.get(key))
    rows = table.ready_prefix([["a0", "a1", "a2", "a3"], ["b0", "b1", "b2"]])
    assert [[e.key for e in row] for row in rows] == [["a0", "a1"], ["b0", "b1"]]
    # a later list shorter than an earlier one trims the earlier rows too
    rows = table.ready_prefix([["a0", "a1", "a2"], ["b0"], ["a0", "a1"]])
    assert [[e.key for e in row] for row in rows] == [["a0"], ["b0"], ["a0"]]
    assert table.ready_prefix([["a0"], ["x"]]) == [] and table.ready_prefix([["a3"]]) == []
    assert table.ready_prefix([]) == []
