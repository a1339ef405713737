"""gpukv's connector stats in vLLM's own stats path and ``/metrics`` (vLLM 0.32:
``vllm/distributed/kv_transfer/kv_connector/v1/metrics.py``).

vLLM collects ``get_kv_connector_stats()`` from every worker and the scheduler each step, sums
them with :meth:`GpukvConnectorStats.aggregate`, ships the plain data to its front end, which
rebuilds it (``GpukvConnector.build_kv_connector_stats``), logs :meth:`~GpukvConnectorStats.reduce`
each interval, and hands it to :class:`GpukvPromMetrics` (``build_prom_metrics``), which exports,
with vLLM's labels (``model_name``, ``engine``):

- ``vllm:gpukv_transfers_total{op}``            loads / stores run (``op``: ``load``, ``store``)
- ``vllm:gpukv_transfer_bytes_total{op}``       bytes they moved
- ``vllm:gpukv_transfer_failures_total{op}``    loads that wrote nothing, stores the server failed
- ``vllm:gpukv_transfer_seconds{op}``           histogram of their wall time
- ``vllm:gpukv_hit_tokens_total{source}``       external hit tokens per gpukv source (``gpu``,
  ``cpu``, ``disk``, ``remote``); vLLM's own ``vllm:prompt_tokens_cached_by_source`` has them
  too, under vLLM's source names (:mod:`.tier_hits`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (KVConnectorPromMetrics,
                                                                  KVConnectorStats)
from vllm.v1.metrics.utils import create_metric_per_engine

from gpukv.engine.hit_sources import SOURCES
from gpukv.integrations.vllm import stats as st

SECONDS_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0]


@dataclass
class GpukvConnectorStats(KVConnectorStats):
    """vLLM's container for :mod:`.stats`' data."""

    def __post_init__(self) -> None:
        if not self.data:
            self.data = st.empty()

    def reset(self) -> None:
        self.data = st.empty()

    def aggregate(self, other: KVConnectorStats) -> "GpukvConnectorStats":
        st.merge(self.data, other.data)
        return self

    def reduce(self) -> dict[str, int | float]:
        return st.reduce(self.data)

    def is_empty(self) -> bool:
        return st.is_empty(self.data)


class GpukvPromMetrics(KVConnectorPromMetrics):
    """The metrics of the module docstring, one child per engine and label value."""

    def __init__(self, vllm_config: Any, metric_types: dict, labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        by_op = labelnames + ["op"]

        def per_engine(metric: Any, label: str, values: tuple[str, ...]) -> dict:
            return {value: create_metric_per_engine(
                        metric, {i: [*v, value] for i, v in per_engine_labelvalues.items()})
                    for value in values}

        self.transfers = per_engine(self._counter_cls(
            name="vllm:gpukv_transfers", documentation="gpukv loads and stores run by the workers.",
            labelnames=by_op), "op", st.OPS)
        self.bytes = per_engine(self._counter_cls(
            name="vllm:gpukv_transfer_bytes",
            documentation="Bytes gpukv loads wrote into vLLM's KV blocks and stores copied out.",
            labelnames=by_op), "op", st.OPS)
        self.failures = per_engine(self._counter_cls(
            name="vllm:gpukv_transfer_failures",
            documentation="gpukv loads that wrote nothing (vLLM recomputes) and stores the server "
                          "failed.", labelnames=by_op), "op", st.OPS)
        self.seconds = per_engine(self._histogram_cls(
            name="vllm:gpukv_transfer_seconds",
            documentation="Wall time of one gpukv load or store (server calls and copy).",
            buckets=SECONDS_BUCKETS, labelnames=by_op), "op", st.OPS)
        self.hit_tokens = per_engine(self._counter_cls(
            name="vllm:gpukv_hit_tokens",
            documentation="Prompt tokens loaded from gpukv, per gpukv source (gpu / cpu: an L1 "
                          "arena there; disk; remote: Redis/Valkey).",
            labelnames=labelnames + ["source"]), "source", SOURCES)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        data = transfer_stats_data
        for op in st.OPS:
            d = data[op]
            self.transfers[op][engine_idx].inc(d["ops"])
            self.bytes[op][engine_idx].inc(d["bytes"])
            self.failures[op][engine_idx].inc(d["failures"])
            for seconds in d["seconds"]:
                self.seconds[op][engine_idx].observe(seconds)
        for source, tokens in data["hit_tokens"].items():
            if source in self.hit_tokens:
                self.hit_tokens[source][engine_idx].inc(tokens)
