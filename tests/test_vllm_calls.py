"""The scheduler's calls (:mod:`gpukv.integrations.vllm.calls`): run in order on one thread, and
waited for at most the step's budget in all, the budget starting at the step's first wait (the
step's forward, between one step's plan and the next step's lookups, spends none of it)."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import pytest

import gpukv.integrations.vllm.calls as calls_module
from gpukv.integrations.vllm.calls import ServerCalls
from vllm_pages import Clock


def test_each_step_waits_at_most_its_budget_from_its_first_wait(monkeypatch):
    waited = []
    monkeypatch.setattr(calls_module, "wait_all", lambda fs, timeout: waited.append(timeout) or (set(), set(fs)))
    clock = Clock()
    calls = ServerCalls(0.05, clock=clock, inline=True)
    pending = Future()
    calls.new_step()
    clock.t = 10.0  # the forward of the step ran
    assert calls.wait([pending]) is None
    clock.t = 10.03
    assert calls.wait([pending]) is None
    clock.t = 10.2  # budget spent: no wait at all
    assert calls.wait([pending]) is None
    calls.new_step()
    clock.t = 11.0
    assert calls.wait([pending]) is None
    assert waited == [pytest.approx(0.05), pytest.approx(0.02), 0.0, pytest.approx(0.05)]
    assert calls.num_late == 4
    done = Future()
    done.set_result(7)
    assert calls.wait([done]) == [7] and len(waited) == 4  # a done call costs no wait


def test_calls_run_in_order_on_one_thread_and_an_unread_failure_is_logged(caplog):
    calls = ServerCalls(5.0)
    gate, order = threading.Event(), []
    first = calls.submit(lambda: gate.wait(30) and order.append("lookup") or 64)
    calls.send(lambda: order.append("end"))
    calls.send(lambda: (_ for _ in ()).throw(TypeError("a bug")))
    assert order == []
    gate.set()
    assert calls.wait([first]) == [64]
    calls.close()
    assert order == ["lookup", "end"]
    assert any("scheduler call raised" in r.getMessage() for r in caplog.records)
    failing = ServerCalls(inline=True).submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        ServerCalls(inline=True).wait([failing])
    with pytest.raises(ValueError, match="budget_s must be a non-negative number"):
        ServerCalls(-1)
