"""The scheduler's calls (:mod:`gpukv.integrations.vllm.calls`): run in order on one thread, and
waited for at most the step's budget in all: the time spent waiting counts, the step's forward
between its waits does not."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import pytest

import gpukv.integrations.vllm.calls as calls_module
from gpukv.integrations.vllm.calls import ServerCalls
from vllm_pages import Clock


def test_each_step_waits_at_most_its_budget_in_all_and_time_outside_its_waits_is_free(monkeypatch):
    clock = Clock()
    waited = []

    def wait_all(fs, timeout):  # an answer that comes after 30 ms; a call that never answers
        waited.append(timeout)
        answered = [f for f in fs if getattr(f, "answer_after", None) is not None]
        if answered:
            clock.t += answered[0].answer_after
            for f in answered:
                f.set_result(7)
            return set(fs), set()
        clock.t += timeout
        return set(), set(fs)

    monkeypatch.setattr(calls_module, "wait_all", wait_all)
    calls = ServerCalls(0.05, clock=clock, inline=True)
    answer, stalled = Future(), Future()
    answer.answer_after = 0.03
    calls.new_step()
    assert calls.wait([answer]) == [7]  # 30 ms of the step's 50 spent
    clock.t += 10.0  # the step's forward: no wait, so none of the budget
    assert calls.wait([stalled]) is None  # what is left: 20 ms
    assert calls.wait([stalled]) is None  # nothing left: no wait at all
    calls.new_step()
    assert calls.wait([stalled]) is None  # the next step: the whole budget again
    assert waited == pytest.approx([0.05, 0.02, 0.0, 0.05], abs=1e-9)
    assert calls.num_late == 3
    done = Future()
    done.set_result(8)
    assert calls.wait([done]) == [8] and len(waited) == 4  # a done call costs no wait


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


class RecordingCalls:
    """The planner's calls, run at once, each hook's waits and step starts logged."""

    def __init__(self, log: list) -> None:
        self.log = log

    def submit(self, fn, *args, **kwargs) -> Future:
        future = Future()
        future.set_result(fn(*args, **kwargs))
        return future

    send = submit

    def wait(self, futures, *, results=True):
        self.log.append("wait")
        return [f.result() for f in futures] if results else []

    def settle(self, futures) -> bool:
        return self.wait(futures, results=False) is not None

    def new_step(self) -> None:
        self.log.append("new step")

    def close(self) -> None:
        pass


class NoHits:
    server_info = {"salt": ""}

    def lookup_hashes(self, model, hashes, **kwargs) -> int:
        return 0

    def end_session(self, request_id) -> None:
        pass


def test_one_budget_per_engine_step_its_lookups_and_the_ends_after_its_forward():
    """vLLM's step: schedule (lookups, the plan), the forward, the step's outputs (requests that
    finished end on the server). The ends spend the budget of the step they finish in; the next
    step's first lookup starts a new one (with the budget restarted at each plan instead, a
    step's lookups and its ends had two budgets: twice the wait a stopped server can cost)."""
    from gpukv.integrations.vllm.plan import RequestInfo, StepView
    from gpukv.integrations.vllm.planner import SchedulerPlanner

    log: list = []
    planner = SchedulerPlanner(NoHits(), "m", tp_size=1, chunk_size=16, block_size=16,
                               calls=RecordingCalls(log))
    prompt = list(range(1, 40))
    for step, rid in enumerate(["a", "b"]):
        log.append(f"schedule {step}")
        assert planner.num_new_matched_tokens(RequestInfo(rid, prompt), 0) == 0
        planner.after_alloc(rid, 0)
        planner.build(StepView([]))
        log.append(f"outputs {step}")  # after the forward
        planner.finished(rid)
    log.append("schedule 2")  # nothing to look up: the plan starts the step's budget
    planner.build(StepView([]))
    assert log == ["schedule 0", "new step", "wait", "outputs 0", "wait",
                   "schedule 1", "new step", "wait", "outputs 1", "wait",
                   "schedule 2", "new step"]
