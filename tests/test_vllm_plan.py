"""The vLLM connector's scheduler-side planning, without vLLM, on a fake client: narrated
scenarios with exact share counts, slot mappings and bytes (pages in the vLLM-CPU layouts, see
``vllm_pages``)."""

from __future__ import annotations

import pytest
import torch

from gpukv.integrations.vllm.keys import MMItem
from gpukv.integrations.vllm.plan import RequestInfo, ScheduledRequest, StepView
from gpukv.integrations.vllm.planner import SchedulerPlanner
from vllm_fakes import FakeClient
from vllm_pages import (BS, CS, MODEL, NB, Clock, cpu_read, engine, fill, new_step, slots_of, spec_slots,
                        store_prompt, tokens)


@pytest.fixture
def client() -> FakeClient:
    return FakeClient(chunk_size=CS)



def test_a_stored_prefix_is_loaded_into_other_blocks_with_the_same_k_and_v(client):
    """Engine A prefills 100 tokens (3 full chunks stored); engine B (fresh pages) gets A's first
    96 tokens + 20 own: 96 tokens load into B's blocks, K and V read back equal to A's."""
    plan_a, work_a, pages_a = engine(client, "a")
    prompt_a = tokens(100, 1)
    info_a = RequestInfo("ra", prompt_a)
    assert plan_a.num_new_matched_tokens(info_a, 0) == 0  # cold cache
    plan_a.after_alloc("ra", 0)
    blocks_a = [3, 9, 1, 7, 12, 5, 20]
    written = fill(pages_a, blocks_a, 100, seed=0)
    step = plan_a.build(new_step("ra", blocks_a, 0, 100))
    assert step.loads == [] and len(step.stores) == 1
    assert step.stores[0].hashes == client.hashes(prompt_a[:96])
    assert spec_slots(step.stores[0]) == slots_of(blocks_a, 96)
    work_a.store(step)
    assert work_a.num_stored_tokens == 96

    plan_b, work_b, pages_b = engine(client, "b")
    prompt_b = tokens(116, 2, prefix=prompt_a[:96])
    info_b = RequestInfo("rb", prompt_b)
    assert plan_b.num_new_matched_tokens(info_b, 0) == 96
    assert client.read_count(MODEL, prompt_b) == [1, 1, 1]
    plan_b.after_alloc("rb", 96)
    blocks_b = [0, 2, 4, 6, 8, 10, 11, 13]
    step = plan_b.build(new_step("rb", blocks_b, 96, 20))
    (load,) = step.loads
    assert load.hashes == client.hashes(prompt_b[:96])
    assert spec_slots(load) == slots_of(blocks_b, 96)
    assert load.report_blocks == blocks_b[:6]
    work_b.load(step)
    assert work_b.take_failed_blocks() == set() and client.total_shares() == 0
    for (key, value), kv in zip(written, pages_b.values()):
        k, v = cpu_read(kv, slots_of(blocks_b, 96))
        assert torch.equal(k, key[:96]) and torch.equal(v, value[:96])
    untouched = [b for b in range(NB) if b not in blocks_b[:6]]
    assert all(kv[untouched].isnan().all() for kv in pages_b.values())


def test_repeated_lookups_while_waiting_take_shares_once_and_relook_after_relookup_s(client):
    plan_a, work_a, pages_a = engine(client, "a", tp_size=1)
    prompt = tokens(70, 3)
    store_prompt(plan_a, work_a, pages_a, "ra", prompt, [0, 1, 2, 3, 4], seed=1)

    plan_b = SchedulerPlanner(client, MODEL, tp_size=1, chunk_size=CS, block_size=BS,
                              relookup_s=5.0, clock=(clock := Clock()))
    info = RequestInfo("rb", prompt)
    for _ in range(4):  # vLLM asks at every step while the request waits for blocks
        assert plan_b.num_new_matched_tokens(info, 0) == 64
    assert client.calls["lookup"] == 2  # A's cold lookup + B's first
    clock.t = 5.0
    assert plan_b.num_new_matched_tokens(info, 32) == 32  # vLLM now holds 2 blocks itself
    assert client.calls["lookup"] == 3
    assert client.read_count(MODEL, prompt) == [1, 1]  # topped up, not added
    plan_b.after_alloc("rb", 32)  # commit: vLLM holds [0, 32), loads [32, 64)
    assert client.read_count(MODEL, prompt) == [0, 1]


def test_the_hit_stays_below_the_prompt_length_and_the_whole_last_chunk_is_loaded(client):
    plan_a, work_a, pages_a = engine(client, "a")
    prompt = tokens(64, 4)  # exactly two chunks
    store_prompt(plan_a, work_a, pages_a, "ra", prompt, [5, 6, 7, 8], seed=2)
    plan_b, work_b, _ = engine(client, "b")
    assert plan_b.num_new_matched_tokens(RequestInfo("rb", prompt), 0) == 63  # vLLM computes 1
    plan_b.after_alloc("rb", 63)
    (load,) = plan_b.build(new_step("rb", [1, 2, 3, 4], 63, 1)).loads
    assert len(load.hashes) * CS == 64 and load.report_blocks == [1, 2, 3, 4]


def test_vllm_local_blocks_get_minus_one_slots_and_their_whole_chunks_free_their_shares(client):
    """vLLM holds 48 tokens (3 blocks) itself: chunk 0 is freed at once; chunk 1 is half vLLM's,
    so it keeps its share and loads only its second block."""
    plan_a, work_a, pages_a = engine(client, "a")
    prompt = tokens(130, 5)
    blocks = list(range(9))
    store_prompt(plan_a, work_a, pages_a, "ra", prompt, blocks, seed=3)
    plan_b, work_b, pages_b = engine(client, "b")
    info = RequestInfo("rb", prompt)
    assert plan_b.num_new_matched_tokens(info, 48) == 128 - 48
    assert client.read_count(MODEL, prompt) == [1, 1, 1, 1]
    plan_b.after_alloc("rb", 80)
    assert client.read_count(MODEL, prompt) == [0, 1, 1, 1]
    blocks_b = [10, 11, 12, 13, 14, 15, 16, 17, 18]
    step = plan_b.build(new_step("rb", blocks_b, 128, 2))
    (load,) = step.loads
    assert spec_slots(load)[:48] == [-1] * 48
    assert spec_slots(load)[48:] == slots_of(blocks_b, 128)[48:]
    assert load.report_blocks == blocks_b[3:8]
    work_b.load(step)
    assert client.total_shares() == 0
    assert all(kv[blocks_b[:3]].isnan().all() and not kv[blocks_b[3:8]].isnan().any()
               for kv in pages_b.values())  # vLLM's own blocks are never written


def test_no_external_tokens_taken_frees_every_share(client):
    plan_a, work_a, pages_a = engine(client, "a")
    prompt = tokens(64, 6)
    store_prompt(plan_a, work_a, pages_a, "ra", prompt, [0, 1, 2, 3], seed=4)
    plan_b, _, _ = engine(client, "b")
    plan_b.num_new_matched_tokens(RequestInfo("rb", prompt + [7]), 0)
    assert client.read_count(MODEL, prompt) == [1, 1]
    plan_b.after_alloc("rb", 0)  # e.g. vLLM kept a local partial-block hit instead
    assert client.read_count(MODEL, prompt) == [0, 0]
    assert plan_b.build(new_step("rb", [4, 5, 6, 7, 8], 0, 65)).loads == []


def test_stores_follow_computed_chunks_through_chunked_prefill_and_decode_without_draft_tokens(client):
    plan, _, _ = engine(client, "a")
    prompt = tokens(90, 7)
    info = RequestInfo("r", prompt)
    plan.num_new_matched_tokens(info, 0)
    plan.after_alloc("r", 0)

    def stored(*scheduled: ScheduledRequest) -> list[list[bytes]]:
        return [s.hashes for s in plan.build(StepView(list(scheduled))).stores]

    ends = [stored(ScheduledRequest("r", [0, 1, 2], True, 0, 40)),  # chunked prefill
            stored(ScheduledRequest("r", [3, 4, 5], False, 40, 50))]
    prompt.extend([11, 12, 13, 14, 15])  # the live token list grows with accepted outputs
    # a decode step with 6 draft tokens: KV for 95 + 6 positions, but only 95 are real tokens
    ends.append(stored(ScheduledRequest("r", [6], False, 94, 7)))
    prompt.append(16)
    ends.append(stored(ScheduledRequest("r", None, False, 95, 1)))
    # each step names only its new chunks, each hash once (the chain of the whole token list)
    chain = client.hashes(prompt[:96])
    assert ends == [[chain[:1]], [chain[1:2]], [], [chain[2:3]]]


def test_a_preempted_request_is_planned_again_with_its_outputs_and_new_blocks(client):
    plan_a, work_a, pages_a = engine(client, "a")
    prompt = tokens(64, 8)
    info = RequestInfo("r", prompt)
    plan_a.num_new_matched_tokens(info, 0)
    plan_a.after_alloc("r", 0)
    fill(pages_a, [0, 1, 2, 3], 64, seed=5)
    work_a.store(plan_a.build(new_step("r", [0, 1, 2, 3], 0, 64)))
    prompt.extend(tokens(10, 9))  # 10 tokens generated, then preempted: vLLM freed the blocks
    plan_a.build(StepView([], preempted=frozenset({"r"})))
    assert client.calls["lookup"] == 1
    assert plan_a.num_new_matched_tokens(info, 0) == 64  # back in the lookup: a fresh plan
    assert client.calls["lookup"] == 2
    plan_a.after_alloc("r", 64)
    step = plan_a.build(StepView([ScheduledRequest("r", [9, 8, 7, 6, 5], True, 64, 10)]))
    assert spec_slots(step.loads[0]) == slots_of([9, 8, 7, 6, 5], 64)
    assert step.stores == []  # chunks 0-1 were stored before the preemption


def test_finishing_a_waiting_request_ends_its_session(client):
    plan_a, work_a, pages_a = engine(client, "a")
    prompt = tokens(64, 10)
    store_prompt(plan_a, work_a, pages_a, "ra", prompt, [0, 1, 2, 3], seed=6)
    plan_b, _, _ = engine(client, "b", tp_size=1)
    plan_b.num_new_matched_tokens(RequestInfo("rb", prompt), 0)
    assert client.total_shares() == 2
    assert plan_b.finished("rb") is False  # aborted while waiting: vLLM may free its blocks now
    assert client.total_shares() == 0 and plan_b.num_tracked == 0
    assert plan_b.finished("never-seen") is False and client.calls["end_session"] == 1


def test_salt_lora_and_multimodal_items_key_disjoint_chains(client):
    plan_a, work_a, pages_a = engine(client, "a")
    prompt = tokens(64, 13)
    salted = RequestInfo("ra", prompt, seed=b"tenant-a", mm_items=(MMItem("img0", 10, 30),))
    plan_a.num_new_matched_tokens(salted, 0)
    plan_a.after_alloc("ra", 0)
    fill(pages_a, [0, 1, 2, 3], 64, seed=9)
    step = plan_a.build(new_step("ra", [0, 1, 2, 3], 0, 64))
    from gpukv.integrations.vllm.keys import chunk_extras

    extras = chunk_extras(salted.mm_items, 2, CS)
    assert extras is not None and step.stores[0].hashes == client.hashes(prompt, b"tenant-a", extras)
    assert step.stores[0].hashes != client.hashes(prompt, b"tenant-a")
    work_a.store(step)
    plan_b, _, _ = engine(client, "b")
    assert plan_b.num_new_matched_tokens(RequestInfo("r1", prompt + [1]), 0) == 0
    assert plan_b.num_new_matched_tokens(RequestInfo("r2", prompt + [1], seed=b"tenant-a"), 0) == 0
    other_image = RequestInfo("r3", prompt + [1], seed=b"tenant-a", mm_items=(MMItem("img1", 10, 30),))
    assert plan_b.num_new_matched_tokens(other_image, 0) == 0
    same = RequestInfo("r4", prompt + [1], seed=b"tenant-a", mm_items=(MMItem("img0", 10, 30),))
    assert plan_b.num_new_matched_tokens(same, 0) == 64


def test_a_prompt_shorter_than_a_chunk_costs_no_round_trip(client):
    plan, _, _ = engine(client, "a")
    info = RequestInfo("short", tokens(CS - 1, 14))
    assert plan.num_new_matched_tokens(info, 0) == 0 and plan.hit_of("short") == 0
    plan.after_alloc("short", 0)
    assert plan.finished("short") is False
    assert client.calls["lookup"] == 0 and client.calls["end_session"] == 0
    # one token more is a full chunk: looked up, and its request ended
    info = RequestInfo("long", tokens(CS, 15))
    plan.num_new_matched_tokens(info, 0)
    plan.finished("long")
    assert client.calls["lookup"] == 1 and client.calls["end_session"] == 1 and plan.num_lookups == 1
