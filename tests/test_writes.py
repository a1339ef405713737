"""WriteBook scenarios: write leases in deadline order, writes by writer, discarded writes that
wait for their writer, and what finish_write / abort_write resolve keys and handles to."""

from __future__ import annotations

from gpukv.l1.entry import Entry, Status
from gpukv.l1.objects import ObjectTable
from gpukv.l1.writes import WriteBook

OK, NF, WS = Status.OK, Status.NOT_FOUND, Status.WRONG_STATE


def begin(table: ObjectTable, book: WriteBook, writer, keys, deadline: float) -> list[Entry]:
    entries = [Entry(key, 0, 1000, 1024, 0, False, writer, deadline, None) for key in keys]
    for entry in entries:
        table.add(entry.key, entry)
    book.begin_all(entries, writer)
    return entries


def resolve(book: WriteBook, table: ObjectTable, items, writer):
    out: list[Status] = []
    return list(book.resolve(items, writer, table.get, out)), out


def test_expired_walks_the_live_writes_in_deadline_order_and_skips_finished_ones():
    table, book = ObjectTable(), WriteBook()
    a, b = begin(table, book, "w1", ["a", "b"], 10.0)
    (c,) = begin(table, book, "w2", ["c"], 20.0)
    (d,) = begin(table, book, "w1", ["d"], 30.0)
    assert len(book) == 4 and book.of_writer("w1") == [a, b, d] and book.of_writer("w2") == [c]
    book.finish(a)  # ready: it has no write lease any more
    table.mark_ready(a)
    assert book.expired(9.9) == [] and book.expired(10.0) == [b]  # deadline == now has expired
    assert book.expired(25.0) == [b, c]  # left in place: the caller discards them
    book.discard(b)
    table.discard(b)
    book.discard(c)
    table.discard(c)
    assert book.expired(100.0) == [d] and len(book) == 1
    assert book.of_writer("w2") == [] and book.of_writer("nobody") == []
    assert book.num_discarded == 2


def test_a_discarded_write_waits_for_its_writer_and_is_released_once():
    table, book = ObjectTable(), WriteBook()
    (k,) = begin(table, book, "slow", ["k"], 10.0)
    book.discard(k)  # its write lease expired during the copy
    table.discard(k)
    assert book.awaits_writer(k) and len(book) == 0 and book.num_discarded == 1
    assert resolve(book, table, [k], "anyone") == ([k], [NF])  # a handle: the pin is released
    book.release(k)
    assert not book.awaits_writer(k) and book.num_discarded == 0
    assert resolve(book, table, [k], "anyone") == ([], [WS])  # and only once


def test_keys_resolve_to_the_writers_own_write_or_its_latest_discarded_one():
    table, book = ObjectTable(), WriteBook()
    k1, j = begin(table, book, "slow", ["k", "j"], 10.0)
    for entry in (k1, j):
        book.discard(entry)
        table.discard(entry)
    (k2,) = begin(table, book, "slow", ["k"], 20.0)  # written again by the same writer...
    book.discard(k2)
    table.discard(k2)  # ... and discarded again: two discarded writes of k wait
    (k3,) = begin(table, book, "fast", ["k"], 30.0)  # k is live again, another writer's
    writes, out = resolve(book, table, ["k", "k", "j", "x"], "slow")
    assert writes == [k2, k2, j] and out == [NF, NF, NF, NF]  # k2 twice: released by the caller
    book.release(k2)
    writes, out = resolve(book, table, ["k"], "slow")
    assert writes == [k1] and out == [NF]  # then the older one
    book.release(k1)
    book.release(j)
    assert resolve(book, table, ["k"], "slow") == ([], [WS])  # only fast's live write is left
    assert resolve(book, table, ["k"], "fast") == ([k3], [OK])


def test_handles_resolve_by_state_and_one_item_at_a_time():
    table, book = ObjectTable(), WriteBook()
    a, b = begin(table, book, "w", ["a", "b"], 10.0)
    out: list[Status] = []
    gen = book.resolve([a, a, b], "ignored", table.get, out)
    assert next(gen) is a and out == [OK]
    book.finish(a)  # the caller ends the first item before the next is resolved
    table.mark_ready(a)
    assert next(gen) is b and out == [OK, WS, OK]  # a is ready now: WRONG_STATE, not yielded
    assert list(gen) == []
