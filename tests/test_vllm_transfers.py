"""The worker's copies on their threads (:mod:`gpukv.integrations.vllm.transfers`), interleaved
deterministically: a fake server whose calls and copies block on events the test releases.

- a step never waits on the server past its budget: a load that has not started is cancelled
  (reported, nothing written), and once the server answers its grant is given back;
- a preempted request's store is cancelled before it starts, or waited for while it copies,
  before vLLM may reuse its blocks; an asynchronous store keeps a finished request's blocks
  until it is copied out;
- layer by layer: a layer's wait returns once that layer is in, not the others;
- asynchronous loads are reported in ``finished_recving``, failures in the same call.
"""

from __future__ import annotations

import threading

import pytest
import torch

from gpukv.integrations.vllm.plan import RequestInfo, StepView
from gpukv.integrations.vllm.transfers import Job
from vllm_fakes import FakeClient
from vllm_pages import CS, D, H, MODEL, Clock, engine, fill, new_step, store_prompt, tokens


class Gated(FakeClient):
    """A fake server whose calls (``begin_store_chunks``, ``begin_retrieve_chunks``) and copies
    (``copy_layers``) wait for the test: ``gates[name]`` (an Event) when one is set; every call
    appends its name to ``order`` when it enters (``entered[name]`` is set) and when it ends."""

    def __init__(self) -> None:
        super().__init__(CS)
        self.gates: dict[str, threading.Event] = {}
        self._entered: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self.order: list[str] = []

    def entered(self, name: str) -> threading.Event:
        with self._lock:
            return self._entered.setdefault(name, threading.Event())

    def _gate(self, name: str):
        self.order.append(name)
        self.entered(name).set()
        gate = self.gates.get(name)
        if gate is not None:
            assert gate.wait(30), f"the test never opened {name}"

    def begin_store_chunks(self, *args, **kwargs):
        self._gate("begin_store")
        return super().begin_store_chunks(*args, **kwargs)

    def begin_retrieve_chunks(self, *args, **kwargs):
        self._gate("begin_retrieve")
        return super().begin_retrieve_chunks(*args, **kwargs)

    def copy_layers(self, copy, stop=None, **kwargs):
        name = f"copy_{copy.op}" + ("" if stop is None else f"_{stop}")
        self._gate(name)
        out = super().copy_layers(copy, stop, **kwargs)
        self.order.append(f"{name} done")
        return out

    def abort(self, copy) -> None:
        self.order.append(f"abort_{copy.op}")
        super().abort(copy)


def threaded(client, name, **options):
    """An engine whose worker runs its copies on its threads (``options``: worker settings)."""
    return engine(client, name, worker_options={"inline": False, **options})


def _prefix(client: Gated) -> list[int]:
    """Engine "a" stored a 64-token prompt (2 chunks), inline; returns it."""
    plan_a, work_a, pages_a = engine(client, "a")
    prompt = tokens(64, 1)
    store_prompt(plan_a, work_a, pages_a, "ra", prompt, [0, 1, 2, 3], seed=1)
    plan_a.finished("ra")
    return prompt


def test_a_load_the_server_does_not_start_within_the_budget_is_cancelled_and_reported():
    client = Gated()
    prompt = _prefix(client)
    plan, work, pages = threaded(client, "b", wait_budget_s=0.0)
    plan.num_new_matched_tokens(RequestInfo("rb", prompt + [5]), 0)
    plan.after_alloc("rb", 64)
    client.gates["begin_retrieve"] = threading.Event()  # the server stalls
    work.load(plan.build(new_step("rb", [4, 5, 6, 7, 8], 64, 1)))
    assert work.take_failed_blocks() == {4, 5, 6, 7}  # reported at once; vLLM recomputes them
    assert client.total_shares() == 2  # the grant has not even been asked for
    client.gates["begin_retrieve"].set()  # the server answers at last
    assert work.transfers.drain(10)
    assert client.order[-2:] == ["begin_retrieve", "abort_retrieve"]  # pinned, then given back
    assert all(kv.isnan().all() for kv in pages.values())  # not a byte written
    assert client.total_shares() == 0 and work.take_completed()[-1].ok is False
    work.close()


def test_a_preempted_requests_store_is_cancelled_before_it_starts_and_waited_for_while_it_copies():
    client = Gated()
    plan, work, pages = threaded(client, "a", store_mode="async")
    prompts = {rid: tokens(64, seed) for seed, rid in enumerate(("r1", "r2"), 2)}
    blocks = {"r1": [0, 1, 2, 3], "r2": [4, 5, 6, 7]}
    for rid, prompt in prompts.items():
        plan.num_new_matched_tokens(RequestInfo(rid, prompt), 0)
        plan.after_alloc(rid, 0)
        fill(pages, blocks[rid], 64, seed=len(rid))
    client.gates.update(copy_store=threading.Event(), begin_store=threading.Event())
    step = plan.build(StepView([new_step(r, blocks[r], 0, 64).requests[0] for r in prompts]))
    work.load(step)
    work.store(step)  # async: returns at once; r1's store waits in STORE_BEGIN, r2's behind it
    assert client.entered("begin_store").wait(10)
    client.gates["begin_store"].set()
    assert client.entered("copy_store").wait(10)  # r1 is copying, r2 queued
    (r1,) = work.transfers.jobs_of("r1")
    waited, returned = threading.Event(), []
    real_wait = r1.copied.wait
    r1.copied.wait = lambda *a: waited.set() or real_wait(*a)  # noqa: E731 - an instrumented wait
    # vLLM preempts both: the next step's forward may overwrite their blocks
    preempt = plan.build(StepView([], preempted=frozenset({"r1", "r2"})))
    assert preempt.preempted == ["r1", "r2"]
    fence = threading.Thread(target=lambda: returned.append(work.preempted(preempt)))
    fence.start()
    assert waited.wait(10)  # r1 is copying: the fence waits for its copy...
    assert returned == []
    client.gates["copy_store"].set()
    fence.join(10)
    assert returned == [None]
    assert work.transfers.drain(10)
    # ...and r2's store, still queued, was cancelled: it never even asked the server
    assert client.order == ["begin_store", "copy_store", "copy_store done"]
    assert len(client.objects) == 2  # r1's two chunks are stored; r2's are not
    work.close()


def test_an_async_store_keeps_a_finished_requests_blocks_until_it_is_copied_out():
    client = Gated()
    plan, work, pages = threaded(client, "a", store_mode="async")
    plan.async_stores = True
    prompt = tokens(64, 4)
    plan.num_new_matched_tokens(RequestInfo("r", prompt), 0)
    plan.after_alloc("r", 0)
    fill(pages, [0, 1, 2, 3], 64, seed=4)
    client.gates["copy_store"] = threading.Event()
    step = plan.build(new_step("r", [0, 1, 2, 3], 0, 64))
    work.load(step)
    work.store(step)
    assert client.entered("copy_store").wait(10)
    assert plan.finished("r") is True  # vLLM keeps the blocks
    nxt = plan.build(StepView([], finished=frozenset({"r"})))
    assert nxt.released == ["r"]
    work.load(nxt)
    assert work.finished(nxt) == (set(), set())  # still reading r's blocks: not reported
    client.gates["copy_store"].set()
    for job in work.transfers.jobs_of("r"):
        job.copied.wait(10)
    later = plan.build(StepView([]))
    assert work.finished(later) == ({"r"}, set())  # reported once, in a later step
    assert work.finished(plan.build(StepView([]))) == (set(), set())
    plan.workers_done(["r"])
    assert plan.num_fenced == 0 and len(client.objects) == 2
    work.close()


def test_layer_by_layer_each_layer_waits_for_its_own_slices_only():
    client = Gated()
    prompt = _prefix(client)
    plan, work, pages = threaded(client, "b", load_mode="layerwise", wait_budget_s=5.0)
    plan.num_new_matched_tokens(RequestInfo("rb", prompt + [5]), 0)
    plan.after_alloc("rb", 64)
    client.gates.update(copy_retrieve_1=threading.Event(), copy_retrieve_2=threading.Event())
    step = plan.build(new_step("rb", [4, 5, 6, 7, 8], 64, 1))
    work.load(step)  # returns at once: the forward starts
    layer0, layer1 = list(pages)
    client.gates["copy_retrieve_1"].set()
    work.wait_layer(layer0)  # layer 0's attention
    assert not pages[layer0][[4, 5, 6, 7]].isnan().any()
    assert pages[layer1][[4, 5, 6, 7]].isnan().all()  # layer 1's slices are not in yet
    assert "copy_retrieve_2 done" not in client.order
    client.gates["copy_retrieve_2"].set()
    work.wait_layer(layer1)
    assert not pages[layer1][[4, 5, 6, 7]].isnan().any()
    work.store(step)  # the end of the forward
    assert work.take_failed_blocks() == set() and work.num_loaded_tokens == 64
    assert work.transfers.drain(10) and client.total_shares() == 0
    work.close()


@pytest.mark.parametrize("fail", [False, True])
def test_an_async_load_is_reported_received_once_done_and_a_failure_in_the_same_call(fail):
    client = Gated()
    prompt = _prefix(client)
    plan, work, pages = threaded(client, "b", load_mode="async")
    plan.async_loads = True
    plan.num_new_matched_tokens(RequestInfo("rb", prompt + [5]), 0)
    plan.after_alloc("rb", 64, [4, 5, 6, 7, 8])  # vLLM schedules it no step: blocks from here
    client.gates["begin_retrieve"] = threading.Event()
    if fail:
        client.fail_next_retrieves = 1
    step = plan.build(StepView([]))  # a step without the request
    (load,) = step.loads
    assert load.report_blocks == [4, 5, 6, 7]
    work.load(step)  # queued after the forward; returns at once
    assert work.finished(step) == (set(), set()) and work.take_failed_blocks() == set()
    assert plan.finished("rb") is False  # an abort now: vLLM keeps the blocks until received
    assert plan.num_fenced == 1 and client.calls["end_session"] == 1  # (engine a's)
    client.gates["begin_retrieve"].set()
    assert work.transfers.drain(10)
    nxt = plan.build(StepView([]))
    assert work.finished(nxt) == (set(), {"rb"})
    assert work.take_failed_blocks() == ({4, 5, 6, 7} if fail else set())
    assert pages[next(iter(pages))][[4, 5, 6, 7]].isnan().all() == fail
    plan.loads_done(["rb"])  # every worker said so: now its server request ends
    assert plan.num_fenced == 0 and client.calls["end_session"] == 2 and client.total_shares() == 0
    work.close()


def test_a_job_claimed_for_copying_is_not_cancelled_and_a_cancelled_one_never_copies():
    job = Job("store", "r", 32)
    assert job.cancel() and job.cancelled and not job.claim()
    other = Job("load", "r", 32, num_layers=2)
    assert other.claim() and not other.cancel()
    other.end_copy(True)
    assert all(e.is_set() for e in other.layers) and other.wait_started(0.0)
    clock = Clock()
    assert clock() == 0.0 and MODEL and torch  # (shared helpers stay imported)


def test_the_stats_count_a_copy_when_it_ends_not_when_it_starts():
    """vLLM's connector stats (bytes, seconds, failures) come from each copy's end on its thread:
    an asynchronous store still copying is not in them; once done, its exact bytes are; a load
    cancelled for time counts as one failed load of no byte; a load counts the bytes it wrote."""
    client = Gated()
    plan, work, pages = threaded(client, "a", store_mode="async")
    per_token = 2 * H * 2 * D * 4  # mha_pages: 2 layers of H heads x (K|V of D) float32
    assert work.token_bytes == per_token
    prompt = tokens(64, 6)
    plan.num_new_matched_tokens(RequestInfo("r", prompt), 0)
    plan.after_alloc("r", 0)
    fill(pages, [0, 1, 2, 3], 64, seed=6)
    client.gates["copy_store"] = threading.Event()
    step = plan.build(new_step("r", [0, 1, 2, 3], 0, 64))
    work.load(step)
    work.store(step)  # returns at once: the copy waits for the gate
    assert client.entered("copy_store").wait(10)
    assert work.stats.take() is None  # begun, not ended: nothing to report yet
    client.gates["copy_store"].set()
    assert work.transfers.drain(10)
    data = work.stats.take()
    assert data["store"]["ops"] == 1 and data["store"]["failures"] == 0
    assert data["store"]["bytes"] == 64 * per_token and len(data["store"]["seconds"]) == 1
    assert data["load"]["ops"] == 0
    # a load the server does not start within the budget: one failed load, no byte
    plan_b, work_b, _ = threaded(client, "b", wait_budget_s=0.0)
    plan_b.num_new_matched_tokens(RequestInfo("rb", prompt + [5]), 0)
    plan_b.after_alloc("rb", 64)
    client.gates["begin_retrieve"] = threading.Event()
    work_b.load(plan_b.build(new_step("rb", [4, 5, 6, 7, 8], 64, 1)))
    client.gates["begin_retrieve"].set()
    assert work_b.transfers.drain(10)
    data = work_b.stats.take()
    assert (data["load"]["ops"], data["load"]["failures"], data["load"]["bytes"]) == (1, 1, 0)
    # a load beside vLLM's own first block: only the three blocks it writes count
    plan_c, work_c, _ = threaded(client, "c", wait_budget_s=10.0)
    plan_c.num_new_matched_tokens(RequestInfo("rc", prompt + [5]), 16)
    plan_c.after_alloc("rc", 48)
    work_c.load(plan_c.build(new_step("rc", [9, 10, 11, 12, 13], 64, 1)))
    assert work_c.transfers.drain(10) and work_c.take_failed_blocks() == set()
    data = work_c.stats.take()
    assert (data["load"]["ops"], data["load"]["failures"], data["load"]["bytes"]) == (1, 0, 48 * per_token)
    for w in (work, work_b, work_c):
        w.close()
