"""Request A fills gpukv, request B reuses A's prefix on a real (tiny, random) transformers model.

DeepSeek-V3 (MLA) runs as a TP=2 group: rank 0 stores, both ranks retrieve into their own pages
and decode; Llama (GQA) runs TP=1. Logits are compared bit for bit with a full prefill of B.
"""

import pytest
import torch

pytest.importorskip("transformers", minversion="5.0")

from gpukv import CacheEngine, EngineConfig  # noqa: E402
from gpukv.testing.prefix_reuse import (  # noqa: E402
    PrefixReuse,
    make_prompts,
    run_demo,
    run_prefix_reuse,
)
from gpukv.integrations.transformers import (  # noqa: E402
    cache_tokens,
    forward,
    tiny_deepseek,
    tiny_llama,
)
from transformers import DynamicCache  # noqa: E402

CS = 32
pytestmark = pytest.mark.slow  # real-model scenarios (a few seconds each on CPU)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Bit-identical logits need a fixed reduction order: one intra-op thread. With two, a run on
    a loaded machine once differed in a logit's last bits (2e-7): how a matmul's sums are split
    can depend on the threads the BLAS gets."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def deepseek():
    return tiny_deepseek()


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def _engine(chunk_size: int = CS) -> CacheEngine:
    return CacheEngine(EngineConfig(capacity_bytes=32 << 20, device="cpu", chunk_size=chunk_size))


class RecordingEngine:
    """Forwards to a real engine and records the calls: the scenario needs only the engine API."""

    def __init__(self, engine: CacheEngine) -> None:
        self.engine, self.calls = engine, []

    def __getattr__(self, name):
        method = getattr(self.engine, name)

        def call(*args, **kwargs):
            self.calls.append((name, args[0] if args else None, kwargs.get("tp_size")))
            return method(*args, **kwargs)
        return call


def test_mla_tp2_both_ranks_retrieve_the_latent_and_match_a_full_prefill(deepseek):
    engine = RecordingEngine(_engine())
    prompt_a, prompt_b = make_prompts(192, 128)  # A: 6 chunks; B: A's first 4 chunks + 64 own tokens
    with PrefixReuse(engine, deepseek, model_name="dsv3-tiny", max_tokens=192, tp_size=2) as scenario:
        assert scenario.store(prompt_a) == 192
        result = scenario.serve(prompt_b, decode_tokens=4)
        # rank 1 never stored nor computed A: its A blocks are still poisoned
        assert all(page[:12].isnan().all() for page in scenario.pages[1])
    assert (result.kind, result.prompt_tokens, result.hit_tokens) == ("mla", 192, 128)
    assert [(r.tp_rank, r.retrieved_tokens, r.used_tokens) for r in result.ranks] == [(0, 128, 128), (1, 128, 128)]
    assert all(r.cache_exact for r in result.ranks)
    assert result.logits_identical and result.max_abs_diff == 0.0
    assert result.generation_identical and len(result.reference_generated) == 5
    assert result.ttft_cached_s > 0 and result.ttft_full_s > 0
    names = [c[0] for c in engine.calls]
    assert names == ["register", "register", "store", "lookup", "retrieve", "retrieve",
                     "free_lookup_locks", "end_session", "unregister", "unregister"]
    assert engine.calls[2][1].endswith("rank0")  # one rank stores for the whole TP group
    assert engine.calls[3][2] == 2  # lookup with tp_size=2: one share per retrieving rank
    stats = engine.engine.stats()
    assert (stats["stored_chunks"], stats["retrieved_chunks"], stats["failed_retrieves"]) == (6, 8, 0)
    assert engine.engine.read_count("dsv3-tiny", prompt_a) == [0] * 6  # every share released


def test_mla_tp2_through_a_gpukv_server(deepseek, tmp_path):
    """The same scenario through ``gpukv serve``: plain torch pages; the server keeps the books
    and owns the arena, the ranks copy in and out of it themselves."""
    from gpukv.frontend.client import CacheClient
    from gpukv.frontend.process import ServerProcess

    address = f"ipc://{tmp_path}/gpukv.sock"
    prompt_a, prompt_b = make_prompts(192, 128)
    with ServerProcess(address, chunk_size=CS), CacheClient(address) as client:
        result = run_prefix_reuse(client, deepseek, prompt_a, prompt_b, model_name="dsv3-tiny",
                                  tp_size=2)
        stats = client.stats()
    assert result.hit_tokens == 128 and [r.retrieved_tokens for r in result.ranks] == [128, 128]
    assert all(r.cache_exact for r in result.ranks) and result.logits_identical
    assert result.generation_identical
    assert (stats["stored_chunks"], stats["retrieved_chunks"], stats["instances"]) == (6, 8, 0)


def test_llama_gqa_partial_chunk_prefix(llama):
    engine = _engine(16)
    prompt_a, prompt_b = make_prompts(160, 100)  # 100 shared tokens: 6 full chunks of 16 hit
    result = run_prefix_reuse(engine, llama, prompt_a, prompt_b, model_name="llama-tiny")
    assert (result.kind, result.hit_tokens) == ("mha", 96)
    assert result.ranks[0].cache_exact and result.logits_identical and result.max_abs_diff == 0.0
    assert result.generation_identical
    assert engine.stats()["instances"] == 0  # unregistered
    assert engine.read_count("llama-tiny", prompt_b) == [0] * 10  # 6 held, 4 absent: no shares


def test_no_shared_prefix_runs_a_full_prefill(llama):
    prompt_a, _ = make_prompts(64, 0, seed=1)
    _, prompt_b = make_prompts(64, 0, seed=2)
    result = run_prefix_reuse(_engine(), llama, prompt_a, prompt_b, model_name="llama-tiny")
    assert result.hit_tokens == 0 and result.ranks[0].retrieved_tokens == 0
    assert not result.ranks[0].cache_exact
    assert result.logits_identical  # the same full prefill twice


@pytest.mark.parametrize("name", ["llama", "deepseek"])
def test_whole_prompt_hit_recomputes_the_last_token(name, llama, deepseek):
    """B == A (4 full chunks): all 128 tokens retrieved, 127 used, the last token recomputed.

    A 1-token suffix runs its matmuls with M=1, which MKL rounds differently from the M=128
    rows of a full prefill: logits then differ by ~1e-7 (fp32). Against the model's own cache
    of the same 127 tokens the logits are bit-identical, so the difference is not the cache.
    """
    model = {"llama": llama, "deepseek": deepseek}[name]
    prompt, _ = make_prompts(128, 128)
    result = run_prefix_reuse(_engine(), model, prompt, prompt, model_name=name, tp_size=1)
    rank = result.ranks[0]
    assert (result.hit_tokens, rank.retrieved_tokens, rank.used_tokens) == (127, 128, 127)
    assert rank.cache_exact and result.generation_identical
    assert result.max_abs_diff < 1e-5
    _, own = forward(model, prompt[:127])
    own_logits, _ = forward(model, prompt[127:], own)
    rebuilt = DynamicCache(config=model.config)
    for i, (k, v) in enumerate(cache_tokens(model, own, 127)):
        rebuilt.update(k.clone(), v.clone(), i)
    assert torch.equal(forward(model, prompt[127:], rebuilt)[0], own_logits)


def test_mha_tp2_is_refused(llama):
    engine = _engine()
    with pytest.raises(ValueError, match="tp_size=2: MHA"):
        PrefixReuse(engine, llama, model_name="llama-tiny", max_tokens=64, tp_size=2)
    assert engine.stats()["instances"] == 0


def test_prompt_longer_than_the_pages_is_refused(llama):
    with PrefixReuse(_engine(), llama, model_name="llama-tiny", max_tokens=64) as scenario:
        with pytest.raises(ValueError, match="prompt of 80 tokens exceeds max_tokens=64"):
            scenario.store(torch.arange(80))


def test_make_prompts_shares_exactly_the_prefix():
    prompt_a, prompt_b = make_prompts(100, 40, seed=3)
    assert prompt_a.shape == prompt_b.shape == (100,)
    assert torch.equal(prompt_a[:40], prompt_b[:40]) and not torch.equal(prompt_a[40:], prompt_b[40:])
    with pytest.raises(ValueError, match="shared_tokens=101"):
        make_prompts(100, 101)


@pytest.mark.parametrize("model", ["tiny-deepseek", "tiny-llama"])
def test_demo_prints_the_outcome_and_exits_0(model, capsys):
    assert run_demo(model, tokens=256, chunk_size=32, decode_tokens=2, repeats=1) == 0
    out = capsys.readouterr().out
    assert "tokens served from cache: 192" in out
    assert "time to first token without cache:" in out and "time to first token with cache:" in out
    assert "logits identical: yes" in out
    assert out.count("cache bit-exact: yes") == (2 if model == "tiny-deepseek" else 1)
    with pytest.raises(ValueError, match="'gpt2' is not one of"):
        run_demo("gpt2", tokens=64, chunk_size=16)
