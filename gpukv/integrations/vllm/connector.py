"""``GpukvConnector``: vLLM's ``KVConnectorBase_V1`` on ``gpukv serve``.

Load it with ``kv_transfer_config={"kv_connector": "GpukvConnector", "kv_connector_module_path":
"gpukv.integrations.vllm", "kv_role": "kv_both", "kv_connector_extra_config": {"gpukv.address":
"ipc:///..."}}`` (keys: :mod:`.config`).

vLLM builds one connector per process: the scheduler side in EngineCore, the worker side in
each worker; they never share memory, so both talk to the server (one ``CacheClient`` each, in
one group per engine, so the workers' retrieves use the shares the scheduler's lookups took).

- Scheduler side (:class:`.planner.SchedulerPlanner`): ``get_num_new_matched_tokens`` looks up
  every pipeline stage within a per-step time budget (``None``: ask again later) and says whether
  the load is asynchronous; ``update_state_after_alloc`` plans the load; ``build_connector_meta``
  ships the step's loads, new chunks to store (hashes and blocks), preemptions and released
  fences in :class:`GpukvMetadata`; ``request_finished`` ends the request or fences it while a
  copy may still use its blocks (ended from ``update_connector_output``: :mod:`.ends`).
- Worker side (:class:`.worker.WorkerSide`): ``register_kv_caches`` registers vLLM's own tensors
  (a worker that cannot register runs uncached; the engine always starts); copies run on the
  worker's threads (:mod:`.transfers`) in the modes ``gpukv.load_mode`` / ``gpukv.store_mode``
  choose: ``start_load_kv``, ``wait_for_layer_load``, ``wait_for_save``, ``handle_preemptions``
  and ``get_finished`` as :mod:`.worker` says. A load that fails is reported through
  ``get_block_ids_with_load_errors`` and vLLM recomputes those blocks.

Reports (:class:`.reports.SchedulerReports`, :class:`.stats.TransferRecorder`): which gpukv tier
served each external hit (``get_external_cache_hit_sources``), the workers' load / store bytes,
times and failures and the scheduler's hits per tier (``get_kv_connector_stats``, exported by
``build_prom_metrics``), the engine's chunks described as vLLM blocks to a server with
``--vllm-events`` and this engine's share of those events (``take_events``).

The failure policy is ``"recompute"`` for gpukv's loads (:mod:`.sides`): a gpukv failure never
fails a request.

Configurations gpukv cannot serve correctly (:func:`.topology.refusal`), or no server to talk to,
leave the connector off for the engine's life: one log line, then every hook is a no-op and
vLLM serves uncached. The constructor signature is the one vLLM 0.32 requires:
``(vllm_config, role, kv_cache_config)``.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    SupportsHMA,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from gpukv.frontend.protocol import default_address
from gpukv.integrations.vllm.config import ConnectorConfig, check_chunking
from gpukv.integrations.vllm.guard import GuardedClient
from gpukv.integrations.vllm.keys import engine_group
from gpukv.integrations.vllm.kv_groups import Parts, kv_groups
from gpukv.integrations.vllm.plan import StepPlan
from gpukv.integrations.vllm.planner import SchedulerPlanner
from gpukv.integrations.vllm.reports import SchedulerReports
from gpukv.integrations.vllm.sides import connect, scheduler_side, worker_side
from gpukv.integrations.vllm.thread_cpus import ThreadCpus
from gpukv.integrations.vllm.topology import pipeline_stages, refusal
from gpukv.integrations.vllm.translate import cpu_attention_isa, engine_model_key, request_info, step_view
from gpukv.integrations.vllm.unconnected import UnconnectedWorker
from gpukv.integrations.vllm.worker import WorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger(__name__)


@dataclass
class GpukvMetadata(KVConnectorMetadata):
    """What the scheduler side hands every worker for one step (vLLM ships it with the
    ``SchedulerOutput``)."""

    plan: StepPlan


class GpukvConnector(KVConnectorBase_V1, SupportsHMA):
    """gpukv's vLLM connector (see the module docstring). ``SupportsHMA``: vLLM keeps its hybrid
    KV cache manager on and hands the connector every KV cache group; full-attention and
    sliding-window groups are cached, each in objects of its own (:mod:`.kv_groups`); a model
    with any other group (SSM states...) runs uncached (:func:`.topology.refusal`) but starts.
    With several groups the loads are asynchronous (vLLM can hear of a failed load of such a
    model only as a failed asynchronous load: ``failed_recving``)."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig") -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        ktc = self._kv_transfer_config
        self.config = cfg = ConnectorConfig.from_extra_config(ktc.kv_connector_extra_config,
                                                              kv_role=ktc.kv_role)
        self.client: GuardedClient | None = None
        self._planner: SchedulerPlanner | None = None
        self._worker: WorkerSide | None = None
        self._reports: SchedulerReports | None = None
        self.started_server = False
        self.thread_cpus = ThreadCpus()  # where a worker's gpukv threads run
        parallel = vllm_config.parallel_config
        self.address = cfg.address or default_address()
        self.groups, why = kv_groups(kv_cache_config)
        self.off = refusal(vllm_config, why)
        if self.off is None:  # both sides, connected or not, plan and report in these modes
            zeroing = bool(getattr(kv_cache_config, "needs_kv_cache_zeroing", False))
            cfg = self.config = cfg.for_groups(self.groups, zeroing)
        # answers the worker hooks while this process runs without gpukv
        self._unconnected = UnconnectedWorker(num_groups=len(self.groups), async_loads=cfg.load_mode == "async")
        if self.off is None:
            self.group = engine_group(ktc.engine_id, int(parallel.data_parallel_rank), cfg.group)
            if role is not KVConnectorRole.SCHEDULER:  # off the forward's cores (:mod:`.thread_cpus`)
                self.thread_cpus = ThreadCpus.for_worker(cfg.worker_cpus)
            self.client, self.started_server, self.off = connect(cfg, self.address, self.group,
                                                                 self.thread_cpus)
        if self.off is not None:
            log.error("gpukv: %s; this engine runs without gpukv", self.off)
            return
        self.block_size = int(kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size)
        try:
            check_chunking(self.client.chunk_size, self.block_size, cfg.chunk_size)
        except ValueError:
            self.client.close()
            raise
        stages = pipeline_stages(vllm_config)

        @functools.cache
        def attention() -> str:  # asked once, for MHA only
            return cpu_attention_isa(vllm_config)

        self.model_keys = [engine_model_key(vllm_config, stage=s, attention=attention) for s in stages]
        self.parts = Parts.of(self.model_keys, self.groups)
        if role is KVConnectorRole.SCHEDULER:
            self._reports, self._planner = scheduler_side(vllm_config, cfg, self.client, self.parts,
                                                          block_size=self.block_size)
        else:
            self._worker = worker_side(vllm_config, cfg, self.client, self.parts, group=self.group,
                                       block_size=self.block_size, thread_cpus=self.thread_cpus)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a store that never happens is a future miss, not a lost hand-off

    # ---- worker side -------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if self._worker is None:
            return
        from vllm.distributed.kv_transfer.kv_connector.utils import get_current_attn_backends

        try:  # the fail-closed edge: whatever goes wrong here, the engine starts (uncached)
            backends = sorted({b.get_name() for b in get_current_attn_backends(self._vllm_config)})
            if len(backends) != 1:
                self._worker.refuse(f"the model uses several attention backends {backends}")
                return
            self._worker.register(kv_caches, backends[0])
        except Exception as exc:  # noqa: BLE001 - logged with its traceback, never raised
            log.error("gpukv: registering the KV caches raised", exc_info=True)
            self._worker.refuse(f"registration raised {type(exc).__name__}: {exc}")

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self._worker is not None:
            self._worker.new_step()

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        # before the step's forward may overwrite the preempted requests' blocks
        if self._worker is not None:
            self._worker.preempted(_plan(kv_connector_metadata))

    @property
    def _side(self) -> WorkerSide | UnconnectedWorker:
        """This worker's copies, or what a worker without gpukv reports (:mod:`.unconnected`)."""
        return self._unconnected if self._worker is None else self._worker

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        plan = _plan(self._connector_metadata)
        self._side.preempted(plan)  # vLLM-CPU's runner may not call handle_preemptions
        self._side.load(plan)

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self._worker is not None:
            self._worker.wait_layer(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor,
                      attn_metadata: "AttentionMetadata", **kwargs: Any) -> None:
        pass  # the stores run from wait_for_save, after every layer

    def wait_for_save(self) -> None:
        if self._worker is not None:
            self._worker.store(_plan(self._connector_metadata))

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        # fenced requests (named in a plan's ``released``) once this worker's copies are done
        # with their blocks; asynchronous loads once done. Reported whatever state this worker
        # is in: vLLM counts every worker's word.
        sending, recving = self._side.finished(_plan(self._connector_metadata))
        return (sending or None), (recving or None)

    def get_transfer_results(self, finished_req_ids: set[str]) -> Any:
        """:meth:`get_finished`, and with several KV cache groups the requests whose
        asynchronous load failed (vLLM recomputes them from the start)."""
        results = super().get_transfer_results(finished_req_ids)
        failed = self._side.take_failed_requests()
        results.failed_recving |= failed
        results.finished_recving |= failed
        return results

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._side.take_failed_blocks()

    def get_kv_connector_stats(self) -> Any:
        """This process's stats since the last call (:mod:`.stats`): a worker's loads and stores,
        the scheduler's hit tokens per gpukv source; None when there are none."""
        side = self._worker or self._reports
        data = side.stats.take() if side is not None else None
        return None if data is None else self.build_kv_connector_stats(data)

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> Any:
        from gpukv.integrations.vllm.prom import GpukvConnectorStats

        return GpukvConnectorStats(data=data or {})

    @classmethod
    def build_prom_metrics(cls, vllm_config: "VllmConfig", metric_types: dict, labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> Any:
        from gpukv.integrations.vllm.prom import GpukvPromMetrics  # vLLM's /metrics (:mod:`.prom`)

        return GpukvPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()
        if self._planner is not None:
            self._planner.close()
        if self._reports is not None:
            self._reports.close()
        if self.client is not None:
            self.client.close()

    # ---- scheduler side ----------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: "Request",
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        if self._planner is None:
            return 0, False
        self._reports.asked(request, num_computed_tokens)
        tokens = self._planner.num_new_matched_tokens(request_info(request), num_computed_tokens)
        return tokens, bool(tokens and self._planner.async_loads)

    def get_external_cache_hit_sources(self, request: "Request",
                                       num_external_tokens: int) -> dict[CacheHitSource, int]:
        """The tokens vLLM loads from gpukv, per tier that held them (:mod:`.tier_hits`)."""
        if num_external_tokens <= 0 or self._reports is None:
            return {CacheHitSource.EXTERNAL_UNSPECIFIED: num_external_tokens} if num_external_tokens else {}
        split = self._reports.hit_sources(request.request_id, num_external_tokens)
        return {CacheHitSource[name]: tokens for name, tokens in split.items()}

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        if self._planner is not None:
            block_ids = blocks.get_block_ids() if num_external_tokens and blocks is not None else None
            self._planner.after_alloc(request.request_id, num_external_tokens, block_ids)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        if self._planner is None:
            return GpukvMetadata(StepPlan(0))
        view = step_view(scheduler_output)
        plan = self._planner.build(view)
        self._reports.step(view)
        return GpukvMetadata(plan)

    def update_connector_output(self, connector_output: "KVConnectorOutput") -> None:
        if self._planner is not None and connector_output.finished_sending:
            self._planner.workers_done(sorted(connector_output.finished_sending))
        if self._planner is not None and connector_output.finished_recving:
            self._planner.loads_done(sorted(connector_output.finished_recving))

    def request_finished(self, request: "Request",
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        if self._planner is None:
            return False, None
        self._reports.finished(request.request_id)
        return self._planner.finished(request.request_id), None

    def request_finished_all_groups(self, request: "Request", block_ids: tuple[list[int], ...]
                                    ) -> tuple[bool, dict[str, Any] | None]:
        """vLLM's call with the hybrid manager on (one block list per KV cache group): the same
        end as :meth:`request_finished` -- the fence keeps every group's blocks."""
        return self.request_finished(request, list(block_ids[0]) if block_ids else [])

    def take_events(self) -> Iterable[Any]:
        """The blocks gpukv holds that this engine republishes, since the last call, as vLLM's
        BlockStored / BlockRemoved (see :mod:`.events`); none unless vLLM's KV events are on
        and the server runs with ``--vllm-events``."""
        return self._reports.take_events() if self._reports is not None else []


def _plan(meta: KVConnectorMetadata | None) -> StepPlan:
    if not isinstance(meta, GpukvMetadata):
        raise TypeError(f"GpukvConnector got connector metadata {type(meta).__name__}, not GpukvMetadata")
    return meta.plan

