"""A server restart heals, a stalled server costs a scheduler step a bounded time, and a worker
that cannot register runs uncached: the connector's planner and worker side on a fake server
(deterministic, a fake clock) and on a real ``gpukv serve`` process (restarted, SIGSTOPped)."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import pytest
import torch

from gpukv.errors import Busy
from gpukv.frontend.client import ServerUnavailable
from gpukv.frontend.process import ServerProcess
from gpukv.integrations.vllm.calls import ServerCalls
from gpukv.integrations.vllm.guard import GuardedClient
from gpukv.integrations.vllm.plan import RequestInfo, StepView
from gpukv.integrations.vllm.planner import SchedulerPlanner
from gpukv.integrations.vllm.registration import RETRY_MIN_S
from gpukv.integrations.vllm.worker import WorkerSide
from vllm_fakes import FakeClient
from vllm_pages import (BS, CS, MODEL, Clock, cpu_read, engine, mha_pages, new_step, served_engine,
                        server_counts, slots_of, store_prompt, tokens)

WORKER_LOG = "gpukv.integrations.vllm.registration"


def _step(planner, worker, rid, prompt, blocks):
    """One engine step for a new request: lookup, admit (no external tokens), compute, store."""
    planner.num_new_matched_tokens(RequestInfo(rid, prompt), 0)
    planner.after_alloc(rid, 0)
    plan = planner.build(new_step(rid, blocks, 0, len(prompt)))
    worker.load(plan)  # vLLM calls start_load_kv before wait_for_save in every step
    worker.store(plan)
    return [t for t in worker.take_completed() if t.op == "store"]  # copies run inline here


def test_a_worker_registers_again_when_its_store_finds_the_server_restarted(caplog):
    client, clock = FakeClient(CS), Clock()
    planner, worker, _ = engine(client, "a", clock=clock)
    assert _step(planner, worker, "r1", tokens(64, 1), [0, 1, 2, 3])[0].done == 64
    client.restart()
    with caplog.at_level(logging.WARNING, logger=WORKER_LOG):
        assert [t.done for t in _step(planner, worker, "r2", tokens(64, 2), [4, 5, 6, 7])] == [0]
        assert worker.client.lost and worker.client.failures["store"] == 1  # noticed at the next step
        assert _step(planner, worker, "r3", tokens(64, 3), [8, 9, 10, 11])[0].done == 64
        assert _step(planner, worker, "r4", tokens(64, 4), [12, 13, 14, 15])[0].done == 64
    assert worker.registered and worker.num_registrations == 2 and client.calls["register"] == 2
    messages = [r.getMessage() for r in caplog.records if r.name == WORKER_LOG]
    assert len(messages) == 2 and "forgot a-tp0" in messages[0] and "registered again" in messages[1]


def test_a_load_only_worker_notices_a_restarted_server_by_its_probe_and_hits_resume():
    """A kv_consumer engine never stores: its scheduler gets no hit for chunks its workers could
    not load (they are not registered on the new server), until the worker's PING shows another
    server process and it registers again."""
    client, clock = FakeClient(CS), Clock()
    plan_a, work_a, pages_a = engine(client, "a", clock=clock)
    prompt = tokens(64, 5)
    plan_b, work_b, _ = engine(client, "b", clock=clock, loadable=True)
    work_b.store_enabled = False
    work_b.load(plan_b.build(StepView([])))  # a step before the restart: probed, next at 10 s
    client.restart()
    work_a.load(plan_a.build(StepView([])))  # A's worker finds out at its next step (probe due)
    store_prompt(plan_a, work_a, pages_a, "ra", prompt, [0, 1, 2, 3], seed=1)
    assert work_a.registered and work_a.num_stored_tokens == 64
    info = RequestInfo("rb", prompt + [9])
    assert plan_b.num_new_matched_tokens(info, 0) == 0  # b's worker is not registered here
    plan_b.after_alloc("rb", 0)
    clock.t = 5.0
    work_b.load(plan_b.build(new_step("rb", [4, 5, 6, 7, 8], 0, 65)))
    assert "b-tp0" not in client.instances  # it probes every probe_s (10 s): not yet
    clock.t = 10.0
    work_b.load(plan_b.build(StepView([])))
    assert "b-tp0" in client.instances and work_b.num_registrations == 2
    assert plan_b.num_new_matched_tokens(RequestInfo("rb2", prompt + [9]), 0) == 64


def test_a_server_back_with_another_chunk_size_leaves_the_worker_uncached(caplog):
    client, clock = FakeClient(CS), Clock()
    planner, worker, _ = engine(client, "a", clock=clock)
    client.restart(chunk_size=2 * CS)
    with caplog.at_level(logging.ERROR, logger=WORKER_LOG):
        assert _step(planner, worker, "r", tokens(64, 6), [0, 1, 2, 3]) == []
    assert worker.refused and "chunk size 64" in worker.refused and not worker.registered
    assert client.calls["register"] == 1 and len([r for r in caplog.records if r.name == WORKER_LOG]) == 1


class _Refusing(FakeClient):
    """Registration fails with the exceptions in ``errors``, one per call, then works."""

    def __init__(self, errors: list[BaseException]) -> None:
        super().__init__(CS)
        self.errors = errors

    def register(self, *args, **kwargs):
        if self.errors:
            self.calls["register"] += 1
            raise self.errors.pop(0)
        return super().register(*args, **kwargs)


def test_a_worker_the_server_does_not_answer_runs_uncached_and_registers_with_backoff(caplog):
    client, clock = _Refusing([ServerUnavailable("no answer"), Busy("busy")]), Clock()
    worker = WorkerSide(GuardedClient(client, clock=clock), instance_id="w", model=MODEL, tp_rank=0,
                        tp_size=1, clock=clock, inline=True)
    with caplog.at_level(logging.WARNING, logger=WORKER_LOG):
        assert worker.register(mha_pages(), "CPU_ATTN") is False
        planner = SchedulerPlanner(GuardedClient(client, clock=clock), MODEL, tp_size=1, chunk_size=CS,
                                   block_size=BS, loadable=True)
        planner.num_new_matched_tokens(RequestInfo("r", tokens(64, 7)), 0)
        planner.after_alloc("r", 0)
        plan = planner.build(new_step("r", [0, 1, 2, 3], 0, 64))
        worker.load(plan)
        worker.store(plan)
        assert worker.take_completed() == [] and client.calls["store"] == 0  # uncached meanwhile
        clock.t = RETRY_MIN_S  # first retry: Busy, the next one 2 s later
        worker.load(planner.build(StepView([])))
        assert not worker.registered and client.calls["register"] == 2
        clock.t = RETRY_MIN_S + 1.9
        worker.load(planner.build(StepView([])))
        assert not worker.registered and client.calls["register"] == 2
        clock.t = RETRY_MIN_S + 2.0
        worker.load(planner.build(StepView([])))
    assert worker.registered and client.calls["register"] == 3
    # one line for the incident, one for its end
    assert [r.levelname for r in caplog.records if r.name == WORKER_LOG] == ["WARNING", "WARNING"]


def test_a_worker_the_server_refuses_runs_uncached_for_good_and_reports_planned_loads(caplog):
    gpu = ValueError("this server has no arena for device cuda-uuid:GPU-4 (it serves cpu)")
    client, clock = _Refusing([gpu]), Clock()
    worker = WorkerSide(GuardedClient(client, clock=clock), instance_id="w", model=MODEL, tp_rank=0,
                        tp_size=1, clock=clock, inline=True)
    with caplog.at_level(logging.ERROR, logger=WORKER_LOG):
        assert worker.register(mha_pages(), "CPU_ATTN") is False
        other = WorkerSide(client, instance_id="x", model=MODEL, tp_rank=0, tp_size=1)
        assert other.register({"l": torch.zeros(4, 16, 9)}, "CPU_ATTN") is False  # no gpukv layout
    assert "no arena for device cuda-uuid:GPU-4" in worker.refused and "[NB, H, BS, 2*D]" in other.refused
    assert len([r for r in caplog.records if r.name == WORKER_LOG]) == 2
    clock.t = 1000.0
    from gpukv.integrations.vllm.plan import LoadSpec, StepPlan

    import numpy as np
    spec = LoadSpec("r", [b"h" * 16], np.arange(CS // BS, dtype=np.int32), [0, 1])
    worker.load(StepPlan(1, loads=[spec]))
    assert worker.take_failed_blocks() == {0, 1} and client.calls["register"] == 1


class _Stalled(FakeClient):
    """Lookups block until ``release`` is set (a stopped server that answers later)."""

    def __init__(self) -> None:
        super().__init__(CS)
        self.release = threading.Event()
        self.order: list[str] = []

    def lookup_hashes(self, *args, **kwargs):
        assert self.release.wait(30)
        self.order.append("lookup")
        return super().lookup_hashes(*args, **kwargs)

    def end_session(self, request_id) -> None:
        self.order.append("end")
        super().end_session(request_id)


def test_a_stalled_lookup_makes_the_request_wait_then_miss_and_its_late_shares_are_ended():
    client, clock = _Stalled(), Clock()
    plan_a, work_a, pages_a = engine(client, "a", clock=clock)
    client.release.set()
    prompt = tokens(64, 8)
    store_prompt(plan_a, work_a, pages_a, "ra", prompt, [0, 1, 2, 3], seed=2)
    plan_a.finished("ra")
    client.release.clear()
    client.order.clear()
    calls = ServerCalls(budget_s=0.0)  # no waiting at all: deterministic
    planner = SchedulerPlanner(GuardedClient(client, clock=clock), MODEL, tp_size=1, chunk_size=CS,
                               block_size=BS, lookup_wait_s=1.0, calls=calls, clock=clock)
    info = RequestInfo("rb", prompt + [1])
    assert planner.num_new_matched_tokens(info, 0) is None  # ask again later
    planner.build(StepView([]))
    clock.t = 0.5
    assert planner.num_new_matched_tokens(info, 0) is None
    clock.t = 1.0
    assert planner.num_new_matched_tokens(info, 0) == 0  # waited long enough: a miss
    assert planner.num_given_up == 1 and client.order == []
    planner.after_alloc("rb", 0)
    assert planner.finished("rb") is False
    client.release.set()  # the server answers at last: the lookup runs, then the request's end
    calls.close()
    assert client.order == ["lookup", "end"] and client.total_shares() == 0


def test_a_stopped_server_costs_a_lookup_the_step_budget_not_the_client_timeout(tmp_path):
    address = f"ipc://{tmp_path}/gpukv.sock"
    with ServerProcess(address, chunk_size=CS, capacity_bytes=16 << 20) as server:
        planner, _, _ = served_engine(address, "b", calls=ServerCalls(budget_s=0.02), lookup_wait_s=0.3)
        os.kill(server.pid, signal.SIGSTOP)
        try:
            answers, slowest = [], 0.0
            deadline = time.monotonic() + 10
            while not answers or answers[-1] is None:
                assert time.monotonic() < deadline
                t0 = time.perf_counter()
                answers.append(planner.num_new_matched_tokens(RequestInfo("r", tokens(64, 9)), 0))
                slowest = max(slowest, time.perf_counter() - t0)
                planner.build(StepView([]))
            # the request waited (None) about lookup_wait_s, then went on without gpukv; no step
            # waited for the client's timeout (30 s here)
            assert answers[0] is None and answers[-1] == 0 and slowest < 1.0
        finally:
            os.kill(server.pid, signal.SIGCONT)
        planner.close()


def test_after_a_restart_the_scheduler_claims_no_hit_until_its_workers_registered_again(tmp_path):
    """The chunks survive the restart on disk and another engine registers the model on the new
    server: a lookup would find them, but engine B's own worker is not registered there yet."""
    address = f"ipc://{tmp_path}/gpukv.sock"
    disk = tmp_path / "disk"
    prompt = tokens(100, 10)
    server = ServerProcess(address, chunk_size=CS, capacity_bytes=16 << 20, disk_dir=disk)
    try:
        plan_a, work_a, pages_a = served_engine(address, "a")
        written = store_prompt(plan_a, work_a, pages_a, "ra", prompt, [3, 9, 1, 7, 12, 5, 20], seed=3)
        plan_a.finished("ra")
        assert work_a.client.client.flush(30)
        plan_b, work_b, pages_b = served_engine(address, "b")
        plan_b.loadable = True
        server.stop()
        server = ServerProcess(address, chunk_size=CS, capacity_bytes=16 << 20, disk_dir=disk)
        served_engine(address, "c")  # another engine of the model on the new server
        info = RequestInfo("rb", prompt[:96] + tokens(20, 11))
        plan_b.loadable = False
        assert plan_b.num_new_matched_tokens(info, 0) == 96  # what an unchecked lookup would claim
        plan_b.finished("rb")
        plan_b.loadable = True
        assert plan_b.num_new_matched_tokens(RequestInfo("rb2", info.token_ids), 0) == 0
        plan_b.after_alloc("rb2", 0)
        work_b.registration.probe_s = 0.0
        work_b.load(plan_b.build(StepView([])))  # its probe sees another server: registers
        assert work_b.registered and work_b.num_registrations == 2
        assert plan_b.num_new_matched_tokens(RequestInfo("rb3", info.token_ids), 0) == 96
        plan_b.after_alloc("rb3", 96)
        blocks = [0, 2, 4, 6, 8, 10, 11, 13]
        work_b.load(plan_b.build(new_step("rb3", blocks, 96, 20)))
        assert work_b.take_failed_blocks() == set()
        for (key, value), kv in zip(written, pages_b.values()):
            k, v = cpu_read(kv, slots_of(blocks, 96))
            assert torch.equal(k, key[:96]) and torch.equal(v, value[:96])
        plan_b.finished("rb2")
        plan_b.finished("rb3")
        assert server_counts(address)["shares"] == 0
    finally:
        server.stop()
