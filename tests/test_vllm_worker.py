"""The vLLM connector's worker side, without vLLM, on a fake client: MLA TP groups (one rank
stores, every rank loads), load failures, the views of vLLM's tensors, and why loads and stores
cover whole CPU blocks."""

from __future__ import annotations

import pytest
import torch

from gpukv.integrations.vllm.plan import RequestInfo
from gpukv.integrations.vllm.planner import SchedulerPlanner
from gpukv.integrations.vllm.layouts import kv_views
from gpukv.integrations.vllm.worker import WorkerSide
from vllm_fakes import FakeClient
from vllm_pages import (BS, CS, D, H, MODEL, NB, cpu_read, engine, fill, mha_pages, new_step,
                        slots_of, store_prompt, tokens)


@pytest.fixture
def client() -> FakeClient:
    return FakeClient(chunk_size=CS)



def test_mla_tp2_one_rank_stores_the_lookup_takes_two_shares_and_each_rank_load_releases_one(client):
    def mla_pages():
        return {f"l{i}": torch.full((NB, 1, BS, 12), float("nan")) for i in range(2)}

    ranks = [engine(client, "a", tp_rank=r, tp_size=2, pages=mla_pages()) for r in (0, 1)]
    planner = ranks[0][0]
    prompt = tokens(70, 11)
    planner.num_new_matched_tokens(RequestInfo("ra", prompt), 0)
    planner.after_alloc("ra", 0)
    gen = torch.Generator().manual_seed(7)
    latents = [torch.randn(70, 12, generator=gen) for _ in range(2)]
    for _, _, pages in ranks:  # both ranks compute the same latent rows
        for kv, lat in zip(pages.values(), latents):
            kv.view(-1, 12)[torch.tensor(slots_of([0, 1, 2, 3, 4], 70))] = lat
    step = planner.build(new_step("ra", [0, 1, 2, 3, 4], 0, 70))
    for _, worker, _ in ranks:
        worker.store(step)
    assert [w.num_stored_tokens for _, w, _ in ranks] == [64, 0] and client.calls["store"] == 1

    b_ranks = [engine(client, "b", tp_rank=r, tp_size=2, pages=mla_pages()) for r in (0, 1)]
    planner_b = b_ranks[0][0]
    assert planner_b.num_new_matched_tokens(RequestInfo("rb", prompt), 0) == 64
    assert client.read_count(MODEL, prompt) == [2, 2]
    planner_b.after_alloc("rb", 64)
    step = planner_b.build(new_step("rb", [10, 11, 12, 13, 14], 64, 6))
    b_ranks[0][1].load(step)
    assert client.read_count(MODEL, prompt) == [1, 1]
    b_ranks[1][1].load(step)
    assert client.read_count(MODEL, prompt) == [0, 0]
    for _, _, pages in b_ranks:
        for kv, lat in zip(pages.values(), latents):
            assert torch.equal(kv.view(-1, 12)[torch.tensor(slots_of([10, 11, 12, 13], 64))], lat[:64])


def test_a_failed_load_reports_its_blocks_and_writes_nothing(client):
    plan_a, work_a, pages_a = engine(client, "a")
    prompt = tokens(64, 12)
    store_prompt(plan_a, work_a, pages_a, "ra", prompt, [0, 1, 2, 3], seed=8)
    plan_b, work_b, pages_b = engine(client, "b")
    plan_b.num_new_matched_tokens(RequestInfo("rb", prompt + [1, 2]), 0)
    plan_b.after_alloc("rb", 64)
    client.fail_next_retrieves = 1  # e.g. the lease ran out
    work_b.load(plan_b.build(new_step("rb", [4, 5, 6, 7, 8], 64, 2)))
    assert work_b.take_failed_blocks() == {4, 5, 6, 7} and work_b.take_failed_blocks() == set()
    assert all(kv.isnan().all() for kv in pages_b.values())
    assert work_b.num_loaded_tokens == 0


def test_bad_input_is_refused_by_name(client):
    with pytest.raises(ValueError, match="chunk_size 24 must be a multiple of block_size 16"):
        SchedulerPlanner(client, MODEL, tp_size=1, chunk_size=24, block_size=16)
    plan, _, _ = engine(client, "a")
    with pytest.raises(ValueError, match="never looked up"):
        plan.after_alloc("nope", 0)
    with pytest.raises(ValueError, match="num_computed_tokens"):
        plan.num_new_matched_tokens(RequestInfo("r", [1, 2]), -1)
    with pytest.raises(ValueError, match="backend 'FLEX_ATTENTION' has no gpukv layout"):
        kv_views({"l": torch.zeros(2, 2, 16, 8)}, "FLEX_ATTENTION")
    with pytest.raises(ValueError, match=r"expects \[NB, H, BS, 2\*D\]"):
        kv_views({"l": torch.zeros(2, 16, 8)}, "CPU_ATTN")
    with pytest.raises(ValueError, match="not contiguous"):
        kv_views({"l": torch.zeros(2, 16, 2, 8).transpose(1, 2)}, "CPU_ATTN")
    with pytest.raises(ValueError, match="tp_rank 2 outside"):
        WorkerSide(client, instance_id="x", model=MODEL, tp_rank=2, tp_size=2)


def test_views_share_vllm_memory():
    pages = mha_pages()
    views, dims, kind = kv_views(pages, "CPU_ATTN")
    view, page = next(iter(views.values())), next(iter(pages.values()))
    assert (dims, kind) == ("NB,H,2,BS,D", "mha") and view.shape == (NB, H, 2, BS, D)
    assert view.data_ptr() == page.data_ptr()
    mla = {"l": torch.zeros(NB, 1, BS, 12)}
    views, dims, kind = kv_views(mla, "CPU_MLA")
    assert (dims, kind) == ("NB,BS,D", "mla") and views["l"].shape == (NB, BS, 12)
    assert views["l"].data_ptr() == mla["l"].data_ptr()


def test_gpu_backends_register_the_tensor_vllm_gives_in_its_physical_order():
    """FLASH_ATTN's logical [NB, H, BS, 2D] layer, here in an NHD physical order (LBNHC): passed
    as it is, and gpukv's descriptor reads that order from the strides. (The layouts are mapped
    from vLLM's source; no GPU runs them here.)"""
    phys = torch.randn(NB, BS, H, 2 * D)  # physical [NB, BS, H, C]
    layer = phys.permute(0, 2, 1, 3)      # logical [NB, H, BS, C]
    views, dims, kind = kv_views({"l": layer}, "FLASH_ATTN")
    assert (dims, kind) == ("NB,H,BS,2D", "mha") and views["l"] is layer
    views_mla, dims_mla, _ = kv_views({"l": torch.zeros(NB, BS, 9)}, "FLASHMLA")
    assert dims_mla == "NB,BS,D" and views_mla["l"].shape == (NB, BS, 9)
    from gpukv.paged.layout import PagedKV

    paged = PagedKV.from_tensors([layer], dims, kind=kind)
    assert paged.stride_token_bytes == H * 2 * D * 4 and paged.stride_head_bytes == 2 * D * 4


def test_row_copies_of_part_of_a_cpu_block_lose_k_which_is_why_chunks_are_whole_blocks():
    """The registered ``NB,H,2,BS,D`` view's K "rows" are not tokens (K is column-major inside a
    block): copying half a block's rows carries V right and K wrong. Whole blocks are exact."""
    half = FakeClient(chunk_size=BS // 2)
    src, dst = mha_pages(1), mha_pages(1)
    for name, pages in (("src", src), ("dst", dst)):
        half.register(name, MODEL, kv_views(pages, "CPU_ATTN")[0], "NB,H,2,BS,D")
    (key, value), = fill(src, [3], BS // 2, seed=11)
    prompt = tokens(BS // 2, 14)
    half.store("src", prompt, torch.tensor(slots_of([3], BS // 2)))
    half.lookup(MODEL, prompt, request_id="r")
    assert half.retrieve("dst", prompt, torch.tensor(slots_of([5], BS // 2)), request_id="r") == BS // 2
    k, v = cpu_read(next(iter(dst.values())), slots_of([5], BS // 2))
    assert torch.equal(v, value)
    assert k.isnan().any()  # K of these tokens sits in rows the copy did not cover
