"""The connector's side of the router-grade events, per-tier hit sources and connector stats, in
this process: vLLM's config objects, real ``vllm.v1.request.Request`` objects hashed by vLLM's
own block hasher (sha256), two engines (scheduler + worker connectors each) on one in-process
``gpukv serve --vllm-events``.

- ``take_events`` hands vLLM ``BlockStored`` events carrying vLLM's own block hashes (the
  request's ``block_hashes``), the parent hash, the token ids and vLLM's block size, medium
  ``gpukv:<tier>``, for the blocks this engine stored first; a second engine storing the same
  prefix republishes nothing.
- ``get_external_cache_hit_sources`` says which tier each loaded token came from (host for the
  CPU L1 arena, disk), only for the tokens beyond vLLM's own hit.
- ``get_kv_connector_stats``: the workers' load / store bytes, the scheduler's hit tokens per tier.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from vllm_runs import require_vllm

require_vllm()

from vllm import SamplingParams  # noqa: E402
from vllm.config import (CacheConfig, KVEventsConfig, KVTransferConfig, ModelConfig,  # noqa: E402
                         ParallelConfig, VllmConfig)
from vllm.distributed.kv_events import BlockRemoved, BlockStored  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402
from vllm.utils.hashing import get_hash_fn_by_name  # noqa: E402
from vllm.v1.core.kv_cache_utils import (get_request_block_hasher, init_none_hash,  # noqa: E402
                                         maybe_convert_block_hash)
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec  # noqa: E402
from vllm.v1.metrics.cache_hit_source import CacheHitSource  # noqa: E402
from vllm.v1.request import Request  # noqa: E402

from frontend_cases import serving  # noqa: E402
from gpukv.integrations.vllm.config import ConnectorConfig  # noqa: E402
from gpukv.integrations.vllm.connector import GpukvConnector  # noqa: E402
from gpukv.testing.tiny_models import write_tiny_model  # noqa: E402
from vllm_pages import tokens  # noqa: E402

BS, NB, CHUNK = 16, 24, 32
NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(3)]
TOKEN_BYTES = 3 * 2 * 64 * 2  # 3 layers x 2 heads x (K|V of 32) x bf16


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(write_tiny_model("tiny-llama", tmp_path_factory.mktemp("events") / "tiny-llama"))


@pytest.fixture(scope="module")
def hasher():
    fn = get_hash_fn_by_name("sha256")
    init_none_hash(fn)
    return get_request_block_hasher(BS, fn)


def _config(model: str, address: str, *, kv_events: bool = True) -> VllmConfig:
    ktc = KVTransferConfig(kv_connector="GpukvConnector", kv_connector_module_path="gpukv.integrations.vllm",
                           kv_role="kv_both", kv_load_failure_policy="recompute",
                           kv_connector_extra_config={"gpukv.address": address, "gpukv.step_budget_s": 1.0})
    return VllmConfig(model_config=ModelConfig(model=model, skip_tokenizer_init=True, dtype="bfloat16"),
                      cache_config=CacheConfig(block_size=BS), parallel_config=ParallelConfig(),
                      kv_transfer_config=ktc,
                      kv_events_config=KVEventsConfig(enable_kv_cache_events=kv_events, publisher="null"))


def _engine(model: str, address: str, **kw) -> SimpleNamespace:
    """One engine: its scheduler-side and worker-side connectors (one config: one engine id)."""
    spec = FullAttentionSpec(block_size=BS, num_kv_heads=2, head_size=32, dtype=torch.bfloat16)
    kv = KVCacheConfig(num_blocks=NB, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(list(NAMES), spec)])
    config = _config(model, address, **kw)
    engine = SimpleNamespace(scheduler=GpukvConnector(config, KVConnectorRole.SCHEDULER, kv),
                             worker=GpukvConnector(config, KVConnectorRole.WORKER, kv))
    buf = torch.randn(len(NAMES), NB, 2, BS, 64).to(torch.bfloat16)  # vLLM-CPU's [NB, H, BS, 2*D]
    engine.pages = {name: buf[i] for i, name in enumerate(NAMES)}
    engine.worker.register_kv_caches(engine.pages)
    assert engine.worker._worker.registered  # noqa: SLF001
    return engine


def _output(rid: str, blocks: list[int], computed: int, scheduled: int) -> SimpleNamespace:
    return SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id=rid, block_ids=(list(blocks),), num_computed_tokens=computed)],
        num_scheduled_tokens={rid: scheduled},
        scheduled_cached_reqs=SimpleNamespace(req_ids=[], new_block_ids=[], num_computed_tokens=[],
                                              resumed_req_ids=set()),
        preempted_req_ids=set(), finished_req_ids=set())


def _serve(engine, request: Request, blocks: list[int], local: int = 0) -> tuple[int, dict]:
    """vLLM's scheduler and model runner on one new request for one step: the lookup, the
    allocation, the hit sources, the plan, the worker's load and store, the end. Returns the
    external tokens and their sources."""
    external, _ = engine.scheduler.get_num_new_matched_tokens(request, local)
    engine.scheduler.update_state_after_alloc(request, None, external)
    sources = engine.scheduler.get_external_cache_hit_sources(request, external)
    meta = engine.scheduler.build_connector_meta(
        _output(request.request_id, blocks, local + external, request.num_tokens - local - external))
    engine.worker.bind_connector_metadata(meta)
    engine.worker.start_load_kv(None)
    engine.worker.wait_for_save()
    assert engine.worker.get_block_ids_with_load_errors() == set()
    engine.worker.clear_connector_metadata()
    engine.scheduler.request_finished(request, blocks)
    return external, sources


def _events(engine, count: int, timeout_s: float = 10.0) -> list:
    """The scheduler connector's take_events, called once per "step" until ``count`` came."""
    got, deadline = [], time.monotonic() + timeout_s
    while len(got) < count and time.monotonic() < deadline:
        got += list(engine.scheduler.take_events())
        time.sleep(0.02)
    return got


def test_take_events_carry_vllms_block_hashes_for_the_engine_that_stored_first(model, hasher, tmp_path):
    with serving(tmp_path, chunk_size=CHUNK, disk_dir=str(tmp_path / "disk"),
                 vllm_events_address=f"ipc://{tmp_path}/vllm-events.sock") as server:
        address = server.config.address
        one, two = _engine(model, address), _engine(model, address)
        prompt = tokens(70, 3)
        a = Request("a", prompt, SamplingParams(max_tokens=1), None, block_hasher=hasher)
        assert len(a.block_hashes) == 4  # vLLM hashed the 4 full blocks of 16
        assert _serve(one, a, [5, 1, 9, 3, 7]) == (0, {})
        assert server.core.flush(10)
        stored = _events(one, 4)  # 2 chunks x (L1, disk)
        assert [type(e) for e in stored] == [BlockStored] * 4
        by_medium = {}
        for e in stored:
            by_medium.setdefault(e.medium, []).append(e)
        assert sorted(by_medium) == ["gpukv:L1", "gpukv:disk"]
        first, second = by_medium["gpukv:L1"]
        vllm_hashes = [maybe_convert_block_hash(h) for h in a.block_hashes]  # what vLLM publishes
        assert first.block_hashes == vllm_hashes[:2] and first.parent_block_hash is None
        assert second.block_hashes == vllm_hashes[2:4] and second.parent_block_hash == vllm_hashes[1]
        assert first.token_ids == prompt[:32] and second.token_ids == prompt[32:64]
        assert first.block_size == BS and first.lora_id is None and first.group_idx == 0

        # engine two loads a's prefix (its external tokens came from the CPU L1 arena) and stores
        # the same chunks: nothing is republished, by either engine
        b = Request("b", prompt[:64] + tokens(10, 4), SamplingParams(max_tokens=1), None, block_hasher=hasher)
        assert _serve(two, b, [2, 8, 4, 6, 0]) == (64, {CacheHitSource.HOST: 64})
        time.sleep(1.2)  # two polls of the describers
        assert list(two.scheduler.take_events()) == [] and list(one.scheduler.take_events()) == []

        # from disk, and beyond vLLM's own hit of one chunk: only the other chunk is external
        server.core.l1.clear()
        removed = _events(one, 2)
        assert [(type(e), e.medium) for e in removed] == [(BlockRemoved, "gpukv:L1")] * 2
        c = Request("c", prompt, SamplingParams(max_tokens=1), None, block_hasher=hasher)
        assert _serve(two, c, [11, 12, 13, 14, 15], local=32) == (32, {CacheHitSource.DISK: 32})

        # connector stats: a worker's store and load bytes, the scheduler's hits per gpukv tier
        store = one.worker.get_kv_connector_stats().data["store"]
        load = two.worker.get_kv_connector_stats().data["load"]
        assert (store["ops"], store["bytes"], store["failures"]) == (1, 64 * TOKEN_BYTES, 0)
        assert (load["ops"], load["bytes"], load["failures"]) == (2, (64 + 32) * TOKEN_BYTES, 0)
        assert len(load["seconds"]) == 2 and all(s > 0 for s in load["seconds"])
        assert two.scheduler.get_kv_connector_stats().data["hit_tokens"] == {"cpu": 64, "disk": 32}
        assert two.worker.get_kv_connector_stats() is None  # taken: the next step starts afresh
        for engine in (one, two):
            engine.scheduler.shutdown()
            engine.worker.shutdown()


def test_without_kv_events_nothing_is_fetched_and_a_server_without_them_is_named(model, hasher, tmp_path,
                                                                                 caplog):
    with serving(tmp_path, chunk_size=CHUNK) as server:
        with caplog.at_level("WARNING"):
            engine = _engine(model, server.config.address)
        assert any("--vllm-events" in r.getMessage() for r in caplog.records)
        a = Request("a", tokens(64, 5), SamplingParams(max_tokens=1), None, block_hasher=hasher)
        _serve(engine, a, [0, 1, 2, 3])
        assert list(engine.scheduler.take_events()) == []
        engine.scheduler.shutdown()
        engine.worker.shutdown()


def test_the_old_events_address_setting_is_still_accepted():
    cfg = ConnectorConfig.from_extra_config({"gpukv.events_address": "ipc:///tmp/x.sock"},
                                            kv_role="kv_both")
    assert cfg.events_address == "ipc:///tmp/x.sock"
    with pytest.raises(ValueError, match="gpukv.events_address"):
        ConnectorConfig.from_extra_config({"gpukv.events_address": "http://x"}, kv_role="kv_both")
