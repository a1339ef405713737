"""KV cache groups (vLLM's hybrid manager) in the connector, without vLLM, on a fake client: which
groups are served, the parts' keys and request ids, each group's share of a copy, a sliding
window's null and freed blocks, and failures reported by request."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gpukv.integrations.vllm.guard import GuardedClient
from gpukv.integrations.vllm.group_copies import group_rows
from gpukv.integrations.vllm.kv_groups import KVGroup, Parts, kv_groups
from gpukv.integrations.vllm.plan import RequestInfo, ScheduledRequest, StepView
from gpukv.integrations.vllm.planner import SchedulerPlanner
from gpukv.integrations.vllm.worker import WorkerSide
from vllm_fakes import FakeClient, GroupView
from vllm_pages import BS, CS, MODEL, Clock, cpu_read, fill, mha_pages, slots_of, tokens

SLIDE, FULL = "model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"


def _spec(name: str, **fields):
    return type(name, (), {})() if not fields else type(name, (), fields)()


def _config(*specs):
    groups = [SimpleNamespace(kv_cache_spec=spec, layer_names=[f"model.layers.{i}.self_attn.attn"])
              for i, spec in enumerate(specs)]
    return SimpleNamespace(kv_cache_groups=groups)


def test_full_and_sliding_groups_are_served_other_kinds_are_refused_naming_the_group():
    groups, why = kv_groups(_config(_spec("SlidingWindowSpec", block_size=16, sliding_window=64),
                                    _spec("FullAttentionSpec", block_size=16)))
    assert why is None
    assert [(g.index, g.kind, g.window, g.layer_names) for g in groups] == [
        (0, "sliding", 64, (SLIDE,)), (1, "full", 0, (FULL,))]
    _, why = kv_groups(_config(_spec("MambaSpec", block_size=528), _spec("FullAttentionSpec", block_size=528)))
    assert "KV cache group 0 is an SSM / linear-attention state (MambaSpec" in why
    _, why = kv_groups(_config(_spec("FullAttentionSpec", block_size=16), _spec("ChunkedLocalAttentionSpec",
                                                                                block_size=16)))
    assert "group 1" in why and "ChunkedLocalAttentionSpec" in why
    _, why = kv_groups(_config(_spec("SlidingWindowSpec", block_size=16, sliding_window=64),
                               _spec("FullAttentionSpec", block_size=32)))
    assert "different block sizes [16, 32]" in why
    _, why = kv_groups(_config(_spec("SlidingWindowSpec", block_size=16, sliding_window=64,
                                     extra_retained_tokens=8)))
    assert "extra_retained_tokens" in why


def test_each_group_has_a_key_and_request_id_of_its_own_and_one_group_keeps_the_plain_ones():
    one = Parts.of(["k0", "k1"])
    assert one.keys == ["k0", "k1"] and one.request_ids("r") == ["r@pp0", "r@pp1"]
    two = Parts.of("k", (KVGroup(0, "sliding", 64), KVGroup(1)))
    assert len(set(two.keys)) == 2 and all(k.startswith("k-") for k in two.keys)
    assert two.request_ids("r") == ["r@g0", "r@g1"]
    other_window = Parts.of("k", (KVGroup(0, "sliding", 128), KVGroup(1)))
    assert other_window.key(0, 0) != two.key(0, 0) and other_window.key(0, 1) == two.key(0, 1)
    only_sliding = Parts.of("k", (KVGroup(0, "sliding", 64),))
    assert only_sliding.key(0, 0) != "k" and only_sliding.request_ids("r") == ["r"]
    with pytest.raises(ValueError, match="positive window"):
        KVGroup(0, "sliding", 0)


def test_a_load_reads_the_chunks_with_a_block_to_write_a_store_only_chunks_whose_blocks_are_all_live():
    hashes = [b"a", b"b", b"c"]
    row = np.array([-1, -1, -1, 7, 8, 9], dtype=np.int32)  # chunk 0 null, chunk 1 half null
    chunks, slots = group_rows(hashes, row, 4, store=False)
    assert chunks == [b"b", b"c"] and slots.tolist() == [-1] * 4 + list(range(28, 32)) + list(range(32, 40))
    chunks, slots = group_rows(hashes, row, 4, store=True)
    assert chunks == [b"c"] and slots.tolist() == list(range(32, 40))
    assert group_rows(hashes, np.arange(6, dtype=np.int32), 4, store=True)[0] == hashes


def _engine(client: FakeClient, name: str, window: int, **worker_options):
    groups = (KVGroup(0, "sliding", window, (SLIDE,)), KVGroup(1, "full", 0, (FULL,)))
    parts, clock = Parts.of(MODEL, groups), Clock()
    pages = mha_pages(2)
    pages = {SLIDE: pages["model.layers.0.self_attn.attn"], FULL: pages["model.layers.1.self_attn.attn"]}
    worker = WorkerSide(GuardedClient(GroupView(client, name), clock=clock), instance_id=f"{name}-tp0",
                        model=[parts.key(0, 0), parts.key(0, 1)], groups=groups, tp_rank=0, tp_size=1,
                        block_size=BS, clock=clock, **{"inline": True, **worker_options})
    assert worker.register(pages, "CPU_ATTN")
    planner = SchedulerPlanner(GuardedClient(GroupView(client, name), clock=clock), MODEL, groups=groups,
                               tp_size=1, chunk_size=CS, block_size=BS, clock=clock,
                               async_loads=worker.load_mode == "async")
    return planner, worker, pages


def _page(pages, layer):
    return {layer: pages[layer]}


def _stored(client: FakeClient, window: int, prompt: list[int], blocks: tuple[list[int], list[int]], **options):
    """Engine "a" computes ``prompt`` into ``blocks`` (one list per group) in one prefill step and
    stores its full chunks; returns (planner, worker, pages, the K written per group)."""
    plan_a, work_a, pages_a = _engine(client, "a", window=window, **options)
    plan_a.num_new_matched_tokens(RequestInfo("ra", prompt), 0)
    plan_a.after_alloc("ra", 0)
    written = {SLIDE: fill(_page(pages_a, SLIDE), blocks[0], len(prompt), seed=3)[0],
               FULL: fill(_page(pages_a, FULL), blocks[1], len(prompt), seed=4)[0]}
    work_a.store(plan_a.build(StepView([ScheduledRequest("ra", blocks, True, 0, len(prompt))])))
    return plan_a, work_a, pages_a, written


def test_two_groups_store_and_a_fresh_engine_loads_every_full_block_and_only_the_windows_blocks():
    client = FakeClient(chunk_size=CS)
    prompt = tokens(70, 1)
    _, work_a, _, written = _stored(client, 24, prompt, ([1, 2, 3, 4, 5], [6, 7, 8, 9, 10]))
    assert work_a.num_stored_tokens == 64 and len(client.objects) == 4  # 2 chunks x 2 groups

    plan_b, work_b, pages_b = _engine(client, "b", window=24, load_mode="async")
    prompt_b = prompt[:64] + tokens(6, 2)
    assert plan_b.num_new_matched_tokens(RequestInfo("rb", prompt_b), 0) == 64
    # vLLM's table for a hit ending at 64 with a window of 24: blocks before token 41 are null
    blocks_b = ([0, 0, 12, 13, 14], [20, 21, 22, 23, 24])
    plan_b.after_alloc("rb", 64, blocks_b)
    step = plan_b.build(StepView([]))
    assert step.loads[0].blocks.tolist() == [[-1, -1, 12, 13], [20, 21, 22, 23]]
    work_b.load(step)
    assert work_b.finished(step) == (set(), {"rb"}) and work_b.take_failed_requests() == set()
    full_k, _ = cpu_read(pages_b[FULL], slots_of(blocks_b[1], 64))
    assert torch.equal(full_k, written[FULL][0][:64])
    slide_k, _ = cpu_read(pages_b[SLIDE], slots_of([12, 13], 32))
    assert torch.equal(slide_k, written[SLIDE][0][32:64])
    assert torch.isnan(pages_b[SLIDE][0]).all()  # the null block is never written
    assert client.calls["retrieve"] == 2  # one per group; the sliding one reads chunk 1 only


def test_a_sliding_chunk_whose_blocks_vllm_may_have_freed_is_not_stored_and_the_hit_stops_before_it():
    client = FakeClient(chunk_size=CS)
    plan_a, work_a, pages_a = _engine(client, "a", window=8)
    token_ids = tokens(40, 5)
    blocks = ([1, 2, 3], [6, 7, 8])
    info = RequestInfo("ra", token_ids)
    plan_a.num_new_matched_tokens(info, 0)
    plan_a.after_alloc("ra", 0)
    fill(_page(pages_a, SLIDE), blocks[0], 40, seed=1)
    fill(_page(pages_a, FULL), blocks[1], 40, seed=2)
    work_a.store(plan_a.build(StepView([ScheduledRequest("ra", blocks, True, 0, 40)])))
    assert len(client.objects) == 2  # chunk 0 in both groups
    for computed in range(40, 64):  # decode: one token a step
        token_ids.append(7)
        new = ([4], [9]) if computed == 47 else None
        step = plan_a.build(StepView([ScheduledRequest("ra", new, False, computed, 1)]))
        work_a.store(step)
    # chunk 1 completed in a step scheduled at 63 tokens: its first block (tokens 32-47) lies
    # before 63 - 8 + 1, vLLM may have freed it: the sliding group does not store chunk 1
    assert step.stores[0].blocks.tolist() == [[-1, 4], [8, 9]]
    assert len(client.objects) == 3
    plan_b, _, _ = _engine(client, "b", window=8)
    assert plan_b.num_new_matched_tokens(RequestInfo("rb", token_ids + [1]), 0) == 32


def test_a_failed_load_of_two_groups_is_reported_by_request_never_by_block():
    client = FakeClient(chunk_size=CS)
    prompt = tokens(70, 1)
    _stored(client, 24, prompt, ([1, 2, 3, 4, 5], [6, 7, 8, 9, 10]))
    plan_b, work_b, pages_b = _engine(client, "b", window=24, load_mode="async")
    assert plan_b.num_new_matched_tokens(RequestInfo("rb", prompt), 0) == 64
    plan_b.after_alloc("rb", 64, ([0, 0, 12, 13, 14], [20, 21, 22, 23, 24]))
    client.fail_next_retrieves = 1  # the full group's objects are gone when the copy begins
    step = plan_b.build(StepView([]))
    work_b.load(step)
    assert work_b.finished(step) == (set(), {"rb"})
    assert work_b.take_failed_requests() == {"rb"} and work_b.take_failed_blocks() == set()
    assert torch.isnan(pages_b[SLIDE]).all() and torch.isnan(pages_b[FULL]).all()  # nothing written
    assert client.total_shares() == 4  # the lookup's shares stay until the request ends
    plan_b.loads_done(["rb"])
    assert plan_b.finished("rb")  # fenced (a load of a recent step) until the workers report it
    plan_b.workers_done(["rb"])
    assert client.total_shares() == 0


class _HeldCopies(FakeClient):
    """A fake whose store copies wait for ``release`` (and say when one is copying)."""

    def __init__(self) -> None:
        super().__init__(chunk_size=CS)
        self.copying, self.release = threading.Event(), threading.Event()

    def copy_layers(self, copy, stop=None, **kw):
        if copy.op == "store":
            self.copying.set()
            assert self.release.wait(10)
        return super().copy_layers(copy, stop, **kw)


def test_with_a_sliding_group_the_next_step_waits_for_the_stores_still_reading_the_blocks():
    client = _HeldCopies()
    _, work_a, _, _ = _stored(client, 24, tokens(70, 1), ([1, 2, 3, 4, 5], [6, 7, 8, 9, 10]), inline=False,
                              store_mode="async")
    assert client.copying.wait(10)  # the asynchronous store is copying out of the blocks
    stepped = threading.Event()
    thread = threading.Thread(target=lambda: (work_a.new_step(), stepped.set()))
    thread.start()
    assert not stepped.wait(0.3)  # vLLM's next forward may not start: a freed block is still read
    client.release.set()
    assert stepped.wait(10)
    thread.join()
    assert work_a.transfers.drain(10) and work_a.num_stored_tokens == 64
    work_a.close()


def test_a_hole_in_the_sliding_groups_chunks_before_the_window_does_not_cut_the_hit():
    client = FakeClient(chunk_size=CS)
    prompt = tokens(100, 1)
    plan_a, _, _, written = _stored(client, 8, prompt, ([1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14]))
    slide_key = plan_a.parts.key(0, 0)
    hole = next(k for k in client.objects if k[0] == slide_key and k[2] == plan_a.chain_of("ra").hashes[1])
    del client.objects[hole]  # e.g. evicted, or never stored (its blocks were freed first)

    plan_b, work_b, pages_b = _engine(client, "b", window=8, load_mode="async")
    prompt_b = prompt[:96] + tokens(4, 2)
    # a prefix of the sliding group would stop at chunk 1; the hit needs only chunk 2 there
    assert plan_b.num_new_matched_tokens(RequestInfo("rb", prompt_b), 0) == 96
    blocks_b = ([0, 0, 0, 0, 0, 15, 16], [17, 18, 19, 20, 21, 22, 23])  # window 8 at 96: block 5 on
    plan_b.after_alloc("rb", 96, blocks_b)
    step = plan_b.build(StepView([]))
    work_b.load(step)
    assert work_b.finished(step) == (set(), {"rb"}) and work_b.take_failed_requests() == set()
    slide_k, _ = cpu_read(pages_b[SLIDE], slots_of([0, 0, 0, 0, 0, 15], 96)[80:])
    assert torch.equal(slide_k, written[SLIDE][0][80:96])
    plan_b.loads_done(["rb"])
    assert plan_b.finished("rb")
    plan_b.workers_done(["rb"])
    assert client.total_shares() == 0  # the sliding part's shares went with the request's end


def test_without_the_windows_chunks_the_hit_falls_back_to_the_sliding_groups_prefix():
    client = FakeClient(chunk_size=CS)
    prompt = tokens(100, 1)
    plan_a, _, _, _ = _stored(client, 8, prompt, ([1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14]))
    slide_key, chain = plan_a.parts.key(0, 0), plan_a.chain_of("ra").hashes
    for c in (1, 2):
        del client.objects[next(k for k in client.objects if k[0] == slide_key and k[2] == chain[c])]
    plan_b, _, _ = _engine(client, "b", window=8)
    assert plan_b.num_new_matched_tokens(RequestInfo("rb", prompt[:96] + [1]), 0) == 32
    plan_b.finished("rb")
    assert client.total_shares() == 0


class _SecondRetrieveFails(FakeClient):
    """A fake whose second RETRIEVE_BEGIN of a job finds its chunk gone (the first group's copy
    has begun: its objects are pinned)."""

    def __init__(self) -> None:
        super().__init__(chunk_size=CS)
        self.begun: list = []

    def begin_retrieve_chunks(self, *args, **kwargs):
        if len(self.begun) == 1:
            self.fail_next_retrieves = 1
        copy = super().begin_retrieve_chunks(*args, **kwargs)
        self.begun.append(copy)
        return copy


def test_a_group_whose_copy_cannot_begin_aborts_the_groups_begun_before_it_and_nothing_is_written():
    client = _SecondRetrieveFails()
    prompt = tokens(70, 1)
    _stored(client, 24, prompt, ([1, 2, 3, 4, 5], [6, 7, 8, 9, 10]))
    plan_b, work_b, pages_b = _engine(client, "b", window=24, load_mode="async")
    assert plan_b.num_new_matched_tokens(RequestInfo("rb", prompt), 0) == 64
    plan_b.after_alloc("rb", 64, ([0, 0, 12, 13, 14], [20, 21, 22, 23, 24]))
    step = plan_b.build(StepView([]))
    work_b.load(step)
    assert work_b.finished(step) == (set(), {"rb"}) and work_b.take_failed_requests() == {"rb"}
    first, second = client.begun
    assert first.grant is not None and first.finished and second.grant is None  # the sliding one aborted
    assert torch.isnan(pages_b[SLIDE]).all() and torch.isnan(pages_b[FULL]).all()
    plan_b.loads_done(["rb"])
    assert plan_b.finished("rb")
    plan_b.workers_done(["rb"])
    assert client.total_shares() == 0
