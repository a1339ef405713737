"""The server's pool takes sessions in turn: a client behind another's flood of long requests
waits for at most one of them per busy session, not for the whole backlog."""

from __future__ import annotations

import threading

import pytest

from gpukv.frontend.fairpool import FairPool


def test_a_flooding_session_cannot_put_another_behind_its_backlog():
    pool = FairPool(1)
    order, gate, done = [], threading.Event(), threading.Event()

    def task(name, wait=False):
        if wait:
            assert gate.wait(10)
        order.append(name)
        if name == "b1" or len(order) == 7:
            done.set()

    pool.submit("A", task, "a1", True)  # the thread is busy with a1 until the gate opens
    for i in range(2, 7):
        pool.submit("A", task, f"a{i}")
    pool.submit("B", task, "b1")
    gate.set()
    assert done.wait(10)
    while len(order) < 7:
        threading.Event().wait(0.01)
    assert order.index("b1") <= 2  # b1 waited for at most one more of A's, not five
    assert pool.shutdown(5) == 0


def test_a_failing_call_does_not_stop_its_thread():
    pool = FairPool(1)
    ran = threading.Event()
    pool.submit("A", lambda: 1 / 0)  # raises: logged, the thread goes on
    pool.submit("A", ran.set)
    assert ran.wait(10)
    assert pool.shutdown(5) == 0


def test_shutdown_drops_what_did_not_start_and_waits_for_what_runs():
    pool = FairPool(1)
    started, gate, ran = threading.Event(), threading.Event(), []
    pool.submit("A", lambda: (started.set(), gate.wait(10), ran.append("long")))
    assert started.wait(10)
    pool.submit("B", ran.append, "never")
    threading.Timer(0.2, gate.set).start()
    assert pool.shutdown(10) == 1 and ran == ["long"]
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit("A", print)


def test_pending_bound_counts_requests_and_bytes_per_session():
    from gpukv.errors import Busy
    from gpukv.frontend.fairpool import PendingBound

    bound = PendingBound(max_requests=2, max_bytes=100)
    assert bound.admit("a", 500) is None  # one request always fits, whatever its size
    assert isinstance(bound.admit("a", 1), Busy)  # then the bytes are over
    assert bound.admit("b", 60) is None and bound.admit("b", 40) is None
    busy = bound.admit("b", 1)
    assert isinstance(busy, Busy) and "2 requests (100 bytes)" in str(busy)
    bound.done("b", 60)
    assert bound.admit("b", 50) is None is bound.admit("c", 1)
    bound.done("a", 500)
    assert bound.admit("a", 100) is None
