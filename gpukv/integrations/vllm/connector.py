"""``GpukvConnector``: vLLM's ``KVConnectorBase_V1`` on ``gpukv serve``.

Load it with ``kv_transfer_config={"kv_connector": "GpukvConnector", "kv_connector_module_path":
"gpukv.integrations.vllm", "kv_role": "kv_both", "kv_load_failure_policy": "recompute",
"kv_connector_extra_config": {"gpukv.address": "ipc:///..."}}`` (keys: :mod:`.config`).

vLLM builds one connector per process: the scheduler side in EngineCore, the worker side in
each TP worker; they never share memory, so both talk to the server (one ``CacheClient`` each,
in one group per engine, so the workers' retrieves use the shares the scheduler's lookups took).

- Scheduler side (:class:`.plan.SchedulerPlanner`): ``get_num_new_matched_tokens`` looks up
  (``tp_size`` shares per MLA object, one per MHA rank shard; idempotent while the request waits),
  ``update_state_after_alloc`` frees the shares of what vLLM already holds and plans the load,
  ``build_connector_meta`` puts the step's loads and stores in :class:`GpukvMetadata`,
  ``request_finished`` ends the request (stores are synchronous, so vLLM may free its blocks).
- Worker side (:class:`.worker.WorkerSide`): ``register_kv_caches`` registers vLLM's own
  tensors; loads are synchronous and run in ``start_load_kv``, which vLLM calls before the
  forward of a step with loads (``has_sync_kv_loads``), so every layer's blocks are in place
  before the first layer runs; stores run in ``wait_for_save``, after the forward wrote the
  step's KV (MLA: rank 0 only). A load that fails is reported through
  ``get_block_ids_with_load_errors``; with ``kv_load_failure_policy="recompute"`` vLLM
  recomputes those blocks (with vLLM's default, "fail", it fails the request: warned at start).

Every call to the server is best effort (:mod:`.guard`). The constructor signature is the one
vLLM 0.32 requires: ``(vllm_config, role, kv_cache_config)``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from gpukv.frontend.client import CacheClient, ServerUnavailable
from gpukv.frontend.protocol import default_address
from gpukv.integrations.vllm.autostart import ensure_server
from gpukv.integrations.vllm.events import EventsBridge
from gpukv.integrations.vllm.config import ConnectorConfig, check_chunking
from gpukv.integrations.vllm.guard import GuardedClient
from gpukv.integrations.vllm.keys import engine_group
from gpukv.integrations.vllm.plan import SchedulerPlanner, StepPlan
from gpukv.integrations.vllm.records import (HookRecorder, chunk_digests, describe_kv_caches,
                                             digest_written)
from gpukv.integrations.vllm.translate import (cpu_attention_isa, engine_model_key, request_info,
                                               step_view, tp_rank)
from gpukv.integrations.vllm.worker import WorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger(__name__)


@dataclass
class GpukvMetadata(KVConnectorMetadata):
    """What the scheduler side hands every worker for one step (vLLM ships it with the
    ``SchedulerOutput``)."""

    plan: StepPlan


class GpukvConnector(KVConnectorBase_V1):
    """gpukv's vLLM connector (see the module docstring)."""

    _cache_hit_source = CacheHitSource.HOST

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig") -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        ktc = self._kv_transfer_config
        self.config = cfg = ConnectorConfig.from_extra_config(ktc.kv_connector_extra_config,
                                                              kv_role=ktc.kv_role)
        groups = kv_cache_config.kv_cache_groups
        if len(groups) != 1:
            raise ValueError(f"GpukvConnector supports one KV cache group, this model has {len(groups)}")
        block_size = int(groups[0].kv_cache_spec.block_size)
        parallel = vllm_config.parallel_config
        self.model_key = engine_model_key(vllm_config, attention=lambda: cpu_attention_isa(vllm_config))
        group = engine_group(ktc.engine_id, parallel.data_parallel_rank, cfg.group)
        self._recorder = HookRecorder(cfg.record_dir, role.name.lower())
        address = cfg.address or default_address()
        started = False
        if cfg.autostart:
            serve_args = list(cfg.autostart_args)
            if cfg.chunk_size is not None and "--chunk-size" not in serve_args:
                serve_args += ["--chunk-size", str(cfg.chunk_size)]
            _, started = ensure_server(address, serve_args=serve_args)
        try:
            raw = CacheClient(address, group=group, timeout_s=cfg.timeout_s)
        except ServerUnavailable as exc:
            raise ServerUnavailable(f"{exc}: start `gpukv serve --address {address}` first, or set "
                                    '"gpukv.autostart": true in kv_connector_extra_config') from None
        try:
            check_chunking(raw.chunk_size, block_size, cfg.chunk_size)
        except ValueError:
            raw.close()
            raise
        self.client = GuardedClient(raw)
        self._planner: SchedulerPlanner | None = None
        self._worker: WorkerSide | None = None
        self._kv_caches: dict[str, torch.Tensor] | None = None
        self._events: EventsBridge | None = None
        tp_size = int(parallel.tensor_parallel_size)
        if role is KVConnectorRole.SCHEDULER:
            if cfg.load and ktc.kv_load_failure_policy != "recompute":
                log.warning("gpukv: kv_load_failure_policy is %r: a gpukv load that fails (the "
                            "server restarted or lost the KV) FAILS the request. gpukv is a "
                            "cache: set \"kv_load_failure_policy\": \"recompute\" in "
                            "--kv-transfer-config to recompute instead.", ktc.kv_load_failure_policy)
            self._planner = SchedulerPlanner(self.client, self.model_key, tp_size=tp_size,
                                             chunk_size=raw.chunk_size, block_size=block_size,
                                             load=cfg.load, store=cfg.store, relookup_s=cfg.relookup_s)
            if cfg.events_address is not None:
                self._events = EventsBridge(cfg.events_address, self.model_key, raw.chunk_size)
        else:
            rank = tp_rank(parallel)
            self._worker = WorkerSide(self.client, instance_id=f"{group}-tp{rank}-{os.getpid()}",
                                      model=self.model_key, tp_rank=rank, tp_size=tp_size,
                                      load=cfg.load, store=cfg.store)
        self._record("__init__", model_key=self.model_key, address=address, started_server=started,
                     server_pid=raw.server_info.get("pid"),
                     chunk_size=raw.chunk_size, block_size=block_size, tp_size=tp_size,
                     kv_role=ktc.kv_role, engine_id=ktc.engine_id,
                     tp_rank=None if self._worker is None else self._worker.tp_rank,
                     use_mla=bool(vllm_config.model_config.use_mla),
                     enable_prefix_caching=bool(vllm_config.cache_config.enable_prefix_caching),
                     load_failure_policy=ktc.kv_load_failure_policy)

    def _record(self, hook: str, **fields: Any) -> None:
        rank = self._worker.tp_rank if getattr(self, "_worker", None) is not None else None
        self._recorder.write(hook, rank, fields)

    # ---- worker side -------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.distributed.kv_transfer.kv_connector.utils import get_current_attn_backends

        backends = {b.get_name() for b in get_current_attn_backends(self._vllm_config)}
        if len(backends) != 1:
            raise ValueError(f"GpukvConnector needs one attention backend, the model uses {sorted(backends)}")
        (backend,) = backends
        self._worker.register(kv_caches, backend)
        self._kv_caches = kv_caches if self.config.record_digests else None
        self._record("register_kv_caches", backend=backend, **describe_kv_caches(kv_caches))

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        self._record("bind_connector_metadata", step=_plan(connector_metadata).step)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        plan = _plan(self._connector_metadata)
        done = self._worker.load(plan)
        if done or self._recorder.active:
            self._record("start_load_kv", step=plan.step, loads=[_transfer(t) for t in done],
                         forward=getattr(forward_context, "attn_metadata", None) is not None,
                         failures=dict(self.client.failures),
                         digests=self._digests([s.slot_mapping for s in plan.loads]))

    def _digests(self, slot_mappings: list) -> list[dict[str, list]] | None:
        """Test aid (``gpukv.record_digests``): per planned transfer, per layer, the digests of
        its chunks' bytes in vLLM's pages (:func:`.records.chunk_digests`)."""
        if not (self.config.record_digests and self._kv_caches and slot_mappings):
            return None
        mla = self._worker.kind == "mla"
        return [{name: chunk_digests(kv.flatten(1, 2) if mla else kv, slots, self.client.chunk_size)
                 for name, kv in self._kv_caches.items()} for slots in slot_mappings]

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self._recorder.active:  # the loads are done in start_load_kv
            self._record("wait_for_layer_load", layer=layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor,
                      attn_metadata: "AttentionMetadata", **kwargs: Any) -> None:
        if self._recorder.active:  # the stores run in wait_for_save, after every layer
            slots = getattr(attn_metadata, "slot_mapping", None)
            self._record("save_kv_layer", layer=layer_name, data_ptr=kv_layer.data_ptr(),
                         shape=list(kv_layer.shape),
                         written=digest_written(kv_layer, slots) if self.config.record_digests else None)

    def wait_for_save(self) -> None:
        plan = _plan(self._connector_metadata)
        done = self._worker.store(plan)
        if done or self._recorder.active:
            self._record("wait_for_save", step=plan.step, stores=[_transfer(t) for t in done],
                         failures=dict(self.client.failures),
                         digests=self._digests([s.slot_mapping for s in plan.stores]))

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return None, None  # loads and stores are synchronous

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed = self._worker.take_failed_blocks()
        if failed:
            self._record("load_errors", block_ids=sorted(failed))
        return failed

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.close()
        if self._events is not None:
            self._events.close()
        self._record("shutdown", failures=dict(self.client.failures), skipped=dict(self.client.skipped),
                     loaded_tokens=getattr(self._worker, "num_loaded_tokens", None),
                     stored_tokens=getattr(self._worker, "num_stored_tokens", None),
                     failed_loads=getattr(self._worker, "num_failed_loads", None))
        self.client.close()
        self._recorder.close()

    # ---- scheduler side ----------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: "Request",
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        t0 = time.perf_counter()
        info = request_info(request)
        ext = self._planner.num_new_matched_tokens(info, num_computed_tokens)
        if self._recorder.active:
            shares = None
            if self.config.record_shares and self._planner.hit_of(info.request_id):
                shares = self.client.read_count(self.model_key, info.token_ids, seed=info.seed)
            self._record("get_num_new_matched_tokens", request_id=info.request_id,
                         num_tokens=len(info.token_ids), num_computed_tokens=num_computed_tokens,
                         hit=self._planner.hit_of(info.request_id), external=ext,
                         seconds=time.perf_counter() - t0, tp_size=self._planner.tp_size,
                         status=getattr(getattr(request, "status", None), "name", None),
                         num_preemptions=getattr(request, "num_preemptions", None),
                         seeded=bool(info.seed), lookups=self._planner.num_lookups, shares=shares)
        return ext, False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        self._planner.after_alloc(request.request_id, num_external_tokens)
        self._record("update_state_after_alloc", request_id=request.request_id,
                     num_external_tokens=num_external_tokens,
                     block_ids=[list(g) for g in blocks.get_block_ids()])

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        view = step_view(scheduler_output)
        plan = self._planner.build(view)
        if self._recorder.active:
            self._record("build_connector_meta", step=plan.step,
                         has_sync_kv_loads=bool(getattr(scheduler_output, "has_sync_kv_loads", False)),
                         view=[[r.request_id, r.block_ids, r.replace_blocks, r.num_computed_tokens,
                                r.num_scheduled_tokens] for r in view.requests],
                         preempted=sorted(view.preempted), finished=sorted(view.finished),
                         loads=[dict(request_id=s.request_id, num_tokens=len(s.token_ids),
                                     num_skipped=int((s.slot_mapping < 0).sum()), block_ids=s.block_ids)
                                for s in plan.loads],
                         stores=[dict(request_id=s.request_id, num_tokens=len(s.token_ids))
                                 for s in plan.stores])
        return GpukvMetadata(plan)

    def request_finished(self, request: "Request",
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        delay = self._planner.finished(request.request_id)
        self._record("request_finished", request_id=request.request_id,
                     status=getattr(getattr(request, "status", None), "name", None),
                     num_tokens=getattr(request, "num_tokens", None))
        return delay, None

    def take_events(self) -> Iterable[Any]:
        """gpukv's KV events of this model since the last call, as vLLM's BlockStored /
        BlockRemoved (see :mod:`.events`); none without ``"gpukv.events_address"``."""
        return self._events.take() if self._events is not None else []


def _plan(meta: KVConnectorMetadata | None) -> StepPlan:
    if not isinstance(meta, GpukvMetadata):
        raise TypeError(f"GpukvConnector got connector metadata {type(meta).__name__}, not GpukvMetadata")
    return meta.plan


def _transfer(t: Any) -> dict[str, Any]:
    return dict(request_id=t.request_id, asked=t.asked, done=t.done, seconds=t.seconds)
