"""The connector stats (:mod:`gpukv.integrations.vllm.stats`) and their vLLM wrappers
(:mod:`gpukv.integrations.vllm.prom`): what a worker records, how vLLM's aggregation sums the
workers', what the Prometheus metrics then show (a private registry here)."""

from __future__ import annotations

from types import SimpleNamespace

import prometheus_client
import pytest
import torch

from gpukv.integrations.vllm import stats as st

from vllm_runs import require_vllm


def test_the_recorder_takes_what_was_recorded_since_the_last_take():
    rec = st.TransferRecorder()
    assert rec.take() is None
    rec.record("load", 1000, 0.002, ok=True)
    rec.record("load", 0, 0.001, ok=False)
    rec.record("store", 500, 0.003, ok=True)
    rec.hits({"cpu": 256, "disk": 128})
    rec.hits({"cpu": 256})
    data = rec.take()
    assert data["load"] == {"ops": 2, "bytes": 1000, "failures": 1, "seconds": [0.002, 0.001]}
    assert data["store"] == {"ops": 1, "bytes": 500, "failures": 0, "seconds": [0.003]}
    assert data["hit_tokens"] == {"cpu": 512, "disk": 128}
    assert rec.take() is None
    with pytest.raises(ValueError, match="'copy'"):
        rec.record("copy", 1, 0.1, ok=True)


def test_merging_sums_and_bounds_the_samples():
    a, b = st.empty(), st.empty()
    a["load"].update(ops=1, bytes=10, failures=0, seconds=[0.5] * (st.MAX_SAMPLES - 1))
    b["load"].update(ops=3, bytes=30, failures=1, seconds=[0.25] * 3)
    b["hit_tokens"]["remote"] = 64
    merged = st.merge(a, b)
    assert merged["load"]["ops"] == 4 and merged["load"]["bytes"] == 40 and merged["load"]["failures"] == 1
    assert len(merged["load"]["seconds"]) == st.MAX_SAMPLES and merged["hit_tokens"] == {"remote": 64}
    reduced = st.reduce(merged)
    assert reduced["load_ops"] == 4 and reduced["load_failures"] == 1 and reduced["hit_tokens_remote"] == 64
    assert st.is_empty(st.empty()) and not st.is_empty(merged)


@pytest.mark.parametrize("dims, shape", [("NB,H,2,BS,D", (8, 2, 2, 16, 32)), ("NB,BS,D", (8, 16, 576)),
                                         ("NB,H,BS,2D", (8, 2, 16, 64))])
def test_token_bytes_of_the_registered_views(dims, shape):
    views = {f"l{i}": torch.zeros(shape, dtype=torch.bfloat16) for i in range(3)}
    per_token = torch.zeros(shape[1:]).numel() // 16 * 2
    assert st.token_bytes(views, dims) == 3 * per_token


def test_vllms_aggregation_and_the_prometheus_metrics():
    require_vllm()
    from prometheus_client import Counter, Gauge, Histogram

    from gpukv.integrations.vllm.prom import GpukvConnectorStats, GpukvPromMetrics

    registry = prometheus_client.CollectorRegistry()
    types = {cls: type(cls.__name__, (cls,), {"__init__": _in(registry, cls)}) for cls in (Counter, Gauge, Histogram)}
    worker0, worker1 = st.TransferRecorder(), st.TransferRecorder()
    worker0.record("load", 4096, 0.004, ok=True)
    worker1.record("load", 4096, 0.006, ok=True)
    worker1.record("store", 2048, 0.002, ok=False)
    scheduler = st.TransferRecorder()
    scheduler.hits({"gpu": 128, "remote": 64})
    total = GpukvConnectorStats(data=worker0.take())
    for other in (worker1.take(), scheduler.take()):
        total = total.aggregate(GpukvConnectorStats(data=other))
    assert not total.is_empty() and total.reduce()["load_MB"] == 0.008
    config = SimpleNamespace(kv_transfer_config=None)  # all the base class reads of it
    prom = GpukvPromMetrics(config, types, ["model_name", "engine"], {0: ["m", "0"]})
    prom.observe(total.to_dict(), 0)

    def value(name, **labels):
        return registry.get_sample_value(name, {"model_name": "m", "engine": "0", **labels})

    assert value("vllm:gpukv_transfers_total", op="load") == 2
    assert value("vllm:gpukv_transfer_bytes_total", op="load") == 8192
    assert value("vllm:gpukv_transfer_failures_total", op="store") == 1
    assert value("vllm:gpukv_transfer_seconds_count", op="load") == 2
    assert value("vllm:gpukv_transfer_seconds_sum", op="load") == pytest.approx(0.01)
    assert value("vllm:gpukv_hit_tokens_total", source="gpu") == 128
    assert value("vllm:gpukv_hit_tokens_total", source="remote") == 64
    assert value("vllm:gpukv_hit_tokens_total", source="disk") == 0
    empty = GpukvConnectorStats()
    assert empty.is_empty() and empty.data == st.empty()


def _in(registry, cls):
    def __init__(self, *args, **kwargs):
        cls.__init__(self, *args, registry=registry, **kwargs)
    return __init__
