"""BackgroundWriter: bounded by items and bytes, batches in order, survives failures, every item
released exactly once, flush/close honour their timeouts. Interleavings are forced with Events
inside the handler, never with sleeps."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter

import pytest

from gpukv.tiers.writer import BackgroundWriter

WAIT_S = 10.0     # upper bound for an Event that must be set (a failing test, not a slow one)
MARGIN_S = 2.0    # scheduling noise on a loaded 2-core machine


class Recorder:
    """A handler whose first batch can be held inside the handler until ``release`` is set."""

    def __init__(self, *, hold_first: bool = False, fail_on: set | None = None) -> None:
        self.batches: list[list] = []
        self.done: list = []
        self.dropped: list[tuple] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.hold_first = hold_first
        self.fail_on = fail_on or set()

    def handler(self, batch: list) -> None:
        self.batches.append(list(batch))
        if self.hold_first and len(self.batches) == 1:
            self.entered.set()
            assert self.release.wait(WAIT_S)
        for item in batch:
            if item in self.fail_on:
                raise RuntimeError(f"boom on {item}")

    def make(self, **kwargs) -> BackgroundWriter:
        kwargs.setdefault("name", "test-writer")
        return BackgroundWriter(self.handler, on_done=self.done.append,
                                on_drop=lambda item, reason: self.dropped.append((item, reason)),
                                **kwargs)

    def released(self) -> Counter:
        return Counter(self.done) + Counter(item for item, _ in self.dropped)


def test_batches_keep_order_and_respect_batch_size():
    rec = Recorder(hold_first=True)
    writer = rec.make(batch_size=4)
    assert writer.submit(0, 1)
    assert rec.entered.wait(WAIT_S)  # the thread holds batch [0]
    assert all(writer.submit(i, 1) for i in range(1, 10))
    assert writer.stats()["queued"] == 9 and writer.stats()["in_flight"] == 1
    rec.release.set()
    assert writer.flush(WAIT_S)
    assert rec.batches == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9]]
    assert rec.done == list(range(10)) and rec.dropped == []
    assert writer.stats() == dict(queued=0, queued_bytes=0, in_flight=0, done=10, dropped=0,
                                  errors=0, callback_errors=0)
    assert writer.close(WAIT_S)


def test_a_raising_item_is_released_counted_logged_and_the_thread_goes_on(caplog):
    rec = Recorder(fail_on={3})
    writer = rec.make(batch_size=1)
    with caplog.at_level(logging.WARNING, logger="gpukv.tiers.writer"):
        assert all(writer.submit(i, 8) for i in range(7))
        assert writer.flush(WAIT_S)
    assert rec.done == [0, 1, 2, 4, 5, 6]
    assert rec.dropped == [(3, "error")]
    stats = writer.stats()
    assert (stats["done"], stats["errors"], stats["dropped"]) == (6, 1, 0)
    assert [r for r in caplog.records if "boom on 3" in r.getMessage()]
    # Still alive: later items are handled.
    assert writer.submit(7, 8) and writer.flush(WAIT_S) and rec.done[-1] == 7
    assert writer.close(WAIT_S)


def test_a_raising_batch_fails_as_a_whole_and_only_that_batch():
    rec = Recorder(hold_first=True, fail_on={3})
    writer = rec.make(batch_size=4)
    assert writer.submit(0, 1) and rec.entered.wait(WAIT_S)
    assert all(writer.submit(i, 1) for i in range(1, 9))
    rec.release.set()
    assert writer.flush(WAIT_S)
    assert rec.batches == [[0], [1, 2, 3, 4], [5, 6, 7, 8]]
    assert rec.done == [0, 5, 6, 7, 8]
    assert rec.dropped == [(i, "error") for i in (1, 2, 3, 4)]
    assert writer.stats()["errors"] == 4 and writer.stats()["done"] == 5
    writer.close(WAIT_S)


def test_failures_are_logged_rate_limited(caplog):
    rec = Recorder(fail_on=set(range(50)))
    writer = rec.make(batch_size=1)
    with caplog.at_level(logging.WARNING, logger="gpukv.tiers.writer"):
        assert all(writer.submit(i, 1) for i in range(50))
        assert writer.flush(WAIT_S)
    failures = [r for r in caplog.records if "failed on a batch" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None
    assert writer.stats()["errors"] == 50 and len(rec.dropped) == 50
    writer.close(WAIT_S)


def test_blocked_handler_full_queue_flush_and_close_honour_their_timeouts():
    rec = Recorder(hold_first=True)
    writer = rec.make(max_items=3, batch_size=1)
    assert writer.submit("a", 1) and rec.entered.wait(WAIT_S)
    assert [writer.submit(x, 1) for x in "bcde"] == [True, True, True, False]
    assert rec.dropped == [("e", "queue_full")]

    start = time.monotonic()
    assert writer.flush(0.2) is False
    assert time.monotonic() - start < 0.2 + MARGIN_S
    start = time.monotonic()
    assert writer.close(0.2) is False  # the handler still holds "a"
    assert time.monotonic() - start < 0.2 + MARGIN_S
    assert rec.dropped == [("e", "queue_full"), ("b", "closed"), ("c", "closed"),
                           ("d", "closed")]
    assert writer.submit("f", 1) is False and rec.dropped[-1] == ("f", "closed")
    assert writer.flush(0) is False  # "a" is still in flight
    rec.release.set()
    assert writer.flush(WAIT_S) and writer.close(WAIT_S)
    assert rec.done == ["a"]
    assert rec.released() == Counter("abcdef")  # each item exactly once
    stats = writer.stats()
    assert (stats["done"], stats["dropped"], stats["errors"], stats["queued"]) == (1, 5, 0, 0)


def test_byte_bound_counts_queued_bytes():
    rec = Recorder(hold_first=True)
    writer = rec.make(max_items=100, max_bytes=100)
    assert writer.submit("hold", 100) and rec.entered.wait(WAIT_S)  # in flight: not queued
    assert writer.submit("a", 60)
    assert writer.submit("b", 50) is False
    assert writer.submit("c", 40) and writer.submit("zero", 0)
    assert writer.submit("huge", 101) is False
    assert writer.stats()["queued_bytes"] == 100 and writer.stats()["queued"] == 3
    assert rec.dropped == [("b", "bytes_full"), ("huge", "too_large")]
    rec.release.set()
    assert writer.flush(WAIT_S)
    assert writer.stats()["queued_bytes"] == 0
    assert writer.submit("b", 50)  # room again
    assert writer.flush(WAIT_S) and rec.done == ["hold", "a", "c", "zero", "b"]
    writer.close(WAIT_S)


def test_max_batch_bytes_splits_batches():
    rec = Recorder(hold_first=True)
    writer = rec.make(batch_size=8, max_batch_bytes=100)
    assert writer.submit(0, 1) and rec.entered.wait(WAIT_S)
    for item, nbytes in [(1, 60), (2, 40), (3, 1), (4, 150), (5, 10)]:
        assert writer.submit(item, nbytes)
    rec.release.set()
    assert writer.flush(WAIT_S)
    # 1+2 fill 100 B; 3 alone (4 would exceed); 4 alone (larger than a batch); then 5.
    assert rec.batches == [[0], [1, 2], [3], [4], [5]]
    writer.close(WAIT_S)


def test_flush_waits_for_earlier_items_only_and_close_does_not_fool_it():
    rec = Recorder(hold_first=True)
    writer = rec.make(batch_size=1)
    assert writer.flush(0)  # nothing submitted: done at once
    assert writer.submit(0, 1) and rec.entered.wait(WAIT_S)
    assert writer.submit(1, 1)
    result: list[bool] = []
    flusher = threading.Thread(target=lambda: result.append(writer.flush(WAIT_S)))
    flusher.start()
    # close() releases the queued item 1 before item 0's batch has finished: the flush
    # started before must keep waiting for item 0.
    assert writer.close(0) is False
    assert rec.dropped == [(1, "closed")]
    assert writer.flush(0) is False and result == []
    rec.release.set()
    flusher.join(WAIT_S)
    assert result == [True] and rec.done == [0]
    assert writer.close(WAIT_S)


def test_every_outcome_releases_each_item_exactly_once():
    rec = Recorder(hold_first=True, fail_on={"err"})
    writer = rec.make(max_items=3, batch_size=2)
    submitted = ["first", "err", "x", "y", "z1", "z2"]
    accepted = [writer.submit(submitted[0], 1)]
    assert rec.entered.wait(WAIT_S)
    accepted += [writer.submit(item, 1) for item in submitted[1:]]
    assert accepted == [True, True, True, True, False, False]
    rec.release.set()
    assert writer.flush(WAIT_S)
    more = ["late1", "late2", "late3"]
    rec.hold_first = False
    for item in more:
        writer.submit(item, 1)
    writer.close(WAIT_S)
    assert rec.released() == Counter(submitted + more)
    stats = writer.stats()
    assert stats["done"] + stats["dropped"] + stats["errors"] == len(submitted + more)
    assert ("err", "error") in rec.dropped and ("x", "error") in rec.dropped  # batch [err, x]


def test_raising_callbacks_are_counted_and_do_not_stop_the_thread():
    handled: list[int] = []

    def bad_done(item: int) -> None:
        raise ValueError(f"callback bug {item}")

    writer = BackgroundWriter(handled.extend, name="cb", on_done=bad_done, batch_size=1)
    assert all(writer.submit(i, 1) for i in range(3))
    assert writer.flush(WAIT_S)
    assert handled == [0, 1, 2]
    assert writer.stats()["callback_errors"] == 3 and writer.stats()["done"] == 3
    writer.close(WAIT_S)


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_items=0), "max_items"), (dict(max_items=True), "max_items"),
    (dict(max_bytes=0), "max_bytes"), (dict(batch_size=0), "batch_size"),
    (dict(max_batch_bytes=-1), "max_batch_bytes"), (dict(name=""), "name"),
])
def test_bad_arguments_name_the_value(kwargs, match):
    kwargs.setdefault("name", "bad")
    with pytest.raises(ValueError, match=match):
        BackgroundWriter(lambda batch: None, **kwargs)


def test_bad_calls_raise_and_change_nothing():
    with pytest.raises(TypeError, match="handler"):
        BackgroundWriter(None, name="x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="on_drop"):
        BackgroundWriter(lambda b: None, name="x", on_drop=3)  # type: ignore[arg-type]
    writer = BackgroundWriter(lambda batch: None, name="x")
    for nbytes in (-1, 1.5, True):
        with pytest.raises(ValueError, match="nbytes"):
            writer.submit("a", nbytes)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timeout_s"):
        writer.flush(-1)
    assert writer.stats()["queued"] == 0 and writer.stats()["dropped"] == 0
    assert writer.close(WAIT_S) and writer.close(WAIT_S)  # idempotent
