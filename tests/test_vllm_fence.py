"""Aborts are fenced: a request that finishes while a load planned for it may still be queued for
the workers keeps its shares (and vLLM keeps its blocks) until every worker has run that step;
then it ends on the server. Planner + worker side on a real in-process ``gpukv serve``, the
interleavings driven step by step (no sleeps)."""

from __future__ import annotations

import torch

from frontend_cases import serving
from gpukv.integrations.vllm.plan import RequestInfo, StepView
from vllm_pages import (CS, cpu_read, new_step, served_engine, server_counts, slots_of, store_prompt,
                        tokens)

BLOCKS_A = [3, 9, 1, 7, 12, 5, 20]
BLOCKS_B = [0, 2, 4, 6, 8, 10, 11, 13]


def _stored_prefix(address: str):
    """Engine A computed a 100-token prompt and stored its 3 full chunks; B's prompt shares them."""
    plan_a, work_a, pages_a = served_engine(address, "a")
    prompt_a = tokens(100, 1)
    written = store_prompt(plan_a, work_a, pages_a, "ra", prompt_a, BLOCKS_A, seed=0)
    assert work_a.num_stored_tokens == 3 * CS and plan_a.finished("ra") is False
    return written, tokens(116, 2, prefix=prompt_a[:96])


def test_an_abort_while_its_load_is_queued_keeps_the_shares_until_the_workers_ran_it(tmp_path):
    with serving(tmp_path, chunk_size=CS) as server:
        address = server.config.address
        written, prompt_b = _stored_prefix(address)
        # engine B schedules asynchronously: two steps may be in flight
        plan_b, work_b, pages_b = served_engine(address, "b", max_in_flight=2)
        assert plan_b.num_new_matched_tokens(RequestInfo("rb", prompt_b), 0) == 96
        plan_b.after_alloc("rb", 96)
        step = plan_b.build(new_step("rb", BLOCKS_B, 96, 20))
        assert len(step.loads) == 1
        # the client goes away while the step waits for the workers
        assert plan_b.finished("rb") is True  # vLLM must keep rb's blocks
        assert server_counts(address)["shares"] == 3 and plan_b.num_fenced == 1
        work_b.load(step)  # the worker runs the step: the load still has its shares
        assert work_b.take_failed_blocks() == set() and work_b.num_loaded_tokens == 96
        for (key, value), kv in zip(written, pages_b.values()):
            k, v = cpu_read(kv, slots_of(BLOCKS_B, 96))
            assert torch.equal(k, key[:96]) and torch.equal(v, value[:96])
        # the next step names it; every worker reports it (finished_sending); then it ends
        after = plan_b.build(StepView([], finished=frozenset({"rb"})))
        assert after.released == ["rb"] and after.loads == []
        assert server_counts(address)["open_requests"] == 1  # rb, until the workers' word
        plan_b.workers_done(after.released)
        counts = server_counts(address)
        assert (counts["shares"], counts["open_requests"], counts["pinned"]) == (0, 0, 0)
        assert plan_b.num_fenced == 0
        assert plan_b.build(StepView([])).released == []  # released once


def test_an_abort_before_its_load_is_planned_drops_the_load_and_ends_at_once(tmp_path):
    with serving(tmp_path, chunk_size=CS) as server:
        address = server.config.address
        _, prompt_b = _stored_prefix(address)
        plan_b, work_b, _ = served_engine(address, "b", max_in_flight=2)
        plan_b.num_new_matched_tokens(RequestInfo("rb", prompt_b), 0)
        plan_b.after_alloc("rb", 96)
        assert plan_b.finished("rb") is False  # no step carries its load: nothing to wait for
        counts = server_counts(address)
        assert (counts["shares"], counts["open_requests"]) == (0, 0)
        step = plan_b.build(new_step("rb", BLOCKS_B, 96, 20))
        assert step.loads == [] and step.released == []
        work_b.load(step)
        assert work_b.take_failed_blocks() == set()


def test_a_request_that_finishes_after_its_load_steps_ran_ends_at_once(tmp_path):
    """Synchronous scheduling (one step in flight): a request finishing steps after its load
    needs no fence; nor does a request that never loaded."""
    with serving(tmp_path, chunk_size=CS) as server:
        address = server.config.address
        _, prompt_b = _stored_prefix(address)
        plan_b, work_b, _ = served_engine(address, "b")
        plan_b.num_new_matched_tokens(RequestInfo("rb", prompt_b), 0)
        plan_b.after_alloc("rb", 96)
        work_b.load(plan_b.build(new_step("rb", BLOCKS_B, 96, 20)))
        plan_b.build(StepView([]))  # a decode step later
        assert plan_b.finished("rb") is False
        plan_b.num_new_matched_tokens(RequestInfo("rc", tokens(80, 3)), 0)  # a miss, never loads
        plan_b.after_alloc("rc", 0)
        assert plan_b.finished("rc") is False
        counts = server_counts(address)
        assert (counts["shares"], counts["open_requests"]) == (0, 0)
        assert work_b.take_failed_blocks() == set()


def test_async_loads_and_stores_end_a_request_only_after_every_copy_of_it(tmp_path):
    """On a real server, copies on the worker's threads: an asynchronous load aborted before it
    ran keeps its request open until the worker reports it received; an asynchronous store of a
    request that finishes keeps its blocks (fenced) until the worker reports it copied out. Then
    nothing is left: no share, no pin, no open request."""
    with serving(tmp_path, chunk_size=CS) as server:
        address = server.config.address
        written, prompt_b = _stored_prefix(address)
        plan_b, work_b, pages_b = served_engine(address, "b", async_loads=True, async_stores=True,
                                                worker_options=dict(inline=False, load_mode="async",
                                                                    store_mode="async"))
        assert plan_b.num_new_matched_tokens(RequestInfo("rb", prompt_b), 0) == 96
        plan_b.after_alloc("rb", 96, BLOCKS_B)
        step = plan_b.build(StepView([]))  # vLLM does not schedule a request it loads async
        assert plan_b.finished("rb") is False  # aborted: vLLM keeps the blocks until received
        assert server_counts(address)["open_requests"] == 1
        work_b.load(step)
        assert work_b.transfers.drain(30)
        assert work_b.finished(plan_b.build(StepView([]))) == (set(), {"rb"})
        for (key, value), kv in zip(written, pages_b.values()):  # the load ran, whole
            k, v = cpu_read(kv, slots_of(BLOCKS_B, 96))
            assert torch.equal(k, key[:96]) and torch.equal(v, value[:96])
        plan_b.loads_done(["rb"])
        counts = server_counts(address)
        assert (counts["shares"], counts["open_requests"], counts["pinned"]) == (0, 0, 0)
        # an asynchronous store: the request finishes before the workers report it
        prompt_c = tokens(70, 5)
        plan_b.num_new_matched_tokens(RequestInfo("rc", prompt_c), 0)
        plan_b.after_alloc("rc", 0)
        step = plan_b.build(new_step("rc", [1, 3, 5, 7, 9], 0, 70))
        work_b.load(step)
        work_b.store(step)
        assert plan_b.finished("rc") is True and plan_b.num_fenced == 1
        after = plan_b.build(StepView([], finished=frozenset({"rc"})))
        assert after.released == ["rc"]
        assert work_b.transfers.drain(30)
        sending, _ = work_b.finished(after)
        assert sending == {"rc"} and work_b.num_stored_tokens == 2 * CS
        plan_b.workers_done(sorted(sending))
        counts = server_counts(address)
        assert (counts["shares"], counts["open_requests"], counts["pinned"]) == (0, 0, 0)
        work_b.close()
