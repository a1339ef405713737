"""O(new) step plans: each request's chunks are hashed once, on the scheduler side
(:mod:`gpukv.integrations.vllm.chain`); a step's plan names only its new chunks (hash + blocks),
so its bytes and the hashing work grow with the step's new chunks, never with the prompt; no
worker hashes anything; STORE_BEGIN names only the new chunks."""

from __future__ import annotations

import numpy as np
import pytest

import gpukv.engine.copies as copies_module
from frontend_cases import serving
from gpukv.engine.keys import chunk_hashes, request_seed
from gpukv.integrations.vllm.chain import ChunkChain
from gpukv.integrations.vllm.keys import MMItem, chunk_extras
from gpukv.integrations.vllm.plan import RequestInfo, ScheduledRequest, StepView
from vllm_fakes import FakeClient
from vllm_pages import BS, CS, engine, fill, new_step, served_engine, server_counts, tokens


def test_a_chain_hashes_each_chunk_once_and_gives_the_data_paths_hashes():
    prompt = tokens(10 * CS + 5, 1)
    items = (MMItem("img", 3 * CS - 4, 20),)
    chain = ChunkChain(CS, salt="s4lt", seed=b"tenant", mm_items=items)
    assert chain.extend(prompt, 3) is chain.hashes and len(chain) == 3
    assert chain.extend(prompt, 2) == chain.hashes[:3] and chain.num_hashed == 3  # nothing new
    chain.extend(prompt, 10)
    want = chunk_hashes(prompt, CS, seed=request_seed("s4lt", b"tenant"), extras=chunk_extras(items, 10, CS))
    assert chain.hashes == want and chain.num_hashed == 10
    with pytest.raises(ValueError, match="11 chunks need 352 tokens, got 325"):
        chain.extend(prompt, 11)


def test_a_long_chunked_prefill_hashes_each_chunk_once_and_each_plan_carries_only_new_chunks():
    """A 128k-token prompt prefilled 2048 tokens a step (64 steps) then decoded: every chunk is
    hashed once and stored once; each step's plan is the size of its new chunks (a flat ~1.6
    KB here), where shipping the token list and slot mapping from token 0 each step (as before)
    would have been ~2 MB in the last step and ~69 MB in all."""
    client = FakeClient(CS)
    plan, work, pages = engine(client, "a")
    n, per_step = 128 * 1024, 2048
    prompt = tokens(n, 2)
    info = RequestInfo("long", prompt)
    plan.num_new_matched_tokens(info, 0)
    plan.after_alloc("long", 0)
    chain = plan.chain_of("long")
    assert chain.num_hashed == n // CS  # the lookup hashed the prompt once
    blocks_per_step = per_step // BS
    sizes, stored, block = [], [], 0
    for computed in range(0, n, per_step):
        new = list(range(block, block + blocks_per_step))
        block += blocks_per_step
        step = plan.build(StepView([ScheduledRequest("long", new, computed == 0, computed, per_step)]))
        (spec,) = step.stores
        assert len(spec.hashes) == per_step // CS and spec.blocks[0].tolist() == new
        stored.extend(spec.hashes)
        sizes.append(step.nbytes())
    prompt.extend([7] * CS)  # decode: one more chunk of outputs
    step = plan.build(StepView([ScheduledRequest("long", list(range(block, block + CS // BS)), False, n, CS)]))
    stored.extend(step.stores[0].hashes)
    assert chain.num_hashed == n // CS + 1  # one hash per chunk, ever
    assert stored == client.hashes(prompt)  # each chunk's hash shipped once, in order
    per_chunk = 16 + 4 * (CS // BS)  # a hash and its blocks (int32)
    assert set(sizes) == {len("long") + (per_step // CS) * per_chunk}
    assert sum(sizes) < 0.05 * sum(8 * 2 * (c + per_step) for c in range(0, n, per_step))


def test_stores_and_loads_name_only_new_chunks_on_a_real_server_and_no_worker_hashes(tmp_path, monkeypatch):
    """Chunked prefill of 100 tokens in 3 steps on a real server: each STORE_BEGIN names the
    step's new chunks; a second engine loads them. The workers' data path never hashes."""
    def no_hashing(*args, **kwargs):
        raise AssertionError("a worker hashed a chunk")

    with serving(tmp_path, chunk_size=CS) as server:
        address = server.config.address
        plan_a, work_a, pages_a = served_engine(address, "a")
        begun = []
        real_begin = work_a.client.client.begin_store_chunks
        monkeypatch.setattr(work_a.client.client, "begin_store_chunks",
                            lambda inst, hashes, slots: begun.append(list(hashes)) or real_begin(inst, hashes, slots))
        monkeypatch.setattr(copies_module, "chunk_hashes", no_hashing)
        prompt = tokens(100, 3)
        plan_a.num_new_matched_tokens(RequestInfo("ra", prompt), 0)
        plan_a.after_alloc("ra", 0)
        blocks = [3, 9, 1, 7, 12, 5, 20]
        fill(pages_a, blocks, 100, seed=0)
        for new, computed, scheduled in (([3, 9, 1], 0, 40), ([7, 12], 40, 30), ([5, 20], 70, 30)):
            step = plan_a.build(StepView([ScheduledRequest("ra", new, computed == 0, computed, scheduled)]))
            work_a.load(step)
            work_a.store(step)
        chain = plan_a.chain_of("ra").hashes
        assert begun == [chain[:1], chain[1:2], chain[2:3]]
        assert work_a.num_stored_tokens == 3 * CS
        plan_b, work_b, _ = served_engine(address, "b")
        assert plan_b.num_new_matched_tokens(RequestInfo("rb", prompt[:96] + [1, 2]), 0) == 96
        plan_b.after_alloc("rb", 96)
        work_b.load(plan_b.build(new_step("rb", [0, 2, 4, 6, 8, 10, 11], 96, 2)))
        assert work_b.take_failed_blocks() == set() and work_b.num_loaded_tokens == 96
        plan_a.finished("ra")
        plan_b.finished("rb")
        assert server_counts(address)["shares"] == 0
        assert np.all(np.asarray(work_b.last_loads[0].done) == 96)
