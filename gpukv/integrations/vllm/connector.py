"""``GpukvConnector``, phase 1: a vLLM ``KVConnectorBase_V1`` that caches nothing and records what
every hook receives, to pin down the hook flow on a real engine before gpukv is wired in.

``get_num_new_matched_tokens`` returns ``(0, False)``, so vLLM runs exactly as without a
connector. With ``kv_connector_extra_config={"gpukv.record_dir": DIR}`` each process appends one
JSON object per hook call to ``DIR/<role>-<pid>.jsonl`` (see :mod:`.records` for the fields);
without it the hooks only count calls. ``"gpukv.record_digests": true`` adds, per saved layer, a
digest of the bytes this step wrote (to compare TP ranks). The metadata carries a step number and the scheduled
requests' block ids, so the worker's records show what crosses the process boundary.

Loaded by vLLM through ``kv_connector_module_path="gpukv.integrations.vllm"``,
``kv_connector="GpukvConnector"``; the constructor signature is the one vLLM 0.32 requires:
``(vllm_config, role, kv_cache_config)``.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from gpukv.integrations.vllm.records import (
    HookRecorder,
    describe_kv_caches,
    describe_output,
    describe_request,
    describe_scheduler_output,
    describe_tensor,
    digest_written,
)
from gpukv.integrations.vllm.translate import engine_model_key, request_info, step_view

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request


@dataclass
class RecordingMetadata(KVConnectorMetadata):
    """What the scheduler side hands the workers each step (phase 1: for the records only)."""

    step: int
    block_ids: dict[str, list[list[int]]] = field(default_factory=dict)


class GpukvConnector(KVConnectorBase_V1):
    """Phase 1: records the hooks, caches nothing (see the module doc)."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig") -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        self._recorder = HookRecorder(extra.get("gpukv.record_dir"), role.name.lower())
        self._digests = bool(extra.get("gpukv.record_digests", False))
        self.calls: collections.Counter[str] = collections.Counter()
        self._step = 0
        cache, parallel = vllm_config.cache_config, vllm_config.parallel_config
        self._record("__init__", engine_id=self._kv_transfer_config.engine_id,
                     model_key=engine_model_key(vllm_config, attention=lambda: cpu_attention_isa(vllm_config)),
                     kv_role=self._kv_transfer_config.kv_role,
                     extra_config={k: str(v) for k, v in extra.items()},
                     block_size=cache.block_size, enable_prefix_caching=cache.enable_prefix_caching,
                     cache_dtype=str(cache.cache_dtype), model=vllm_config.model_config.model,
                     dtype=str(vllm_config.model_config.dtype),
                     use_mla=bool(vllm_config.model_config.use_mla),
                     tp_size=parallel.tensor_parallel_size, rank=parallel.rank,
                     executor=str(parallel.distributed_executor_backend),
                     kv_cache_groups=[{"layers": list(g.layer_names),
                                       "spec": type(g.kv_cache_spec).__name__,
                                       "block_size": g.kv_cache_spec.block_size}
                                      for g in kv_cache_config.kv_cache_groups],
                     num_blocks=kv_cache_config.num_blocks)

    def _record(self, hook: str, **fields: Any) -> None:
        self.calls[hook] += 1
        self._recorder.write(hook, self._tp_rank(), fields)

    def _tp_rank(self) -> int | None:
        if self.role is not KVConnectorRole.WORKER:
            return None
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank, model_parallel_is_initialized

        return get_tensor_model_parallel_rank() if model_parallel_is_initialized() else None

    # ---- worker side -------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._record("register_kv_caches", **describe_kv_caches(kv_caches))

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        self._record("bind_connector_metadata", metadata=_describe_metadata(connector_metadata))

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        self._record("handle_preemptions", metadata=_describe_metadata(kv_connector_metadata))

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        attn = getattr(forward_context, "attn_metadata", None)
        first = next(iter(attn.values()), None) if isinstance(attn, dict) else attn
        self._record("start_load_kv", metadata=_describe_metadata(self._connector_metadata),
                     attn_metadata=type(attn).__name__,
                     layers=sorted(attn) if isinstance(attn, dict) else None,
                     first_layer_metadata=type(first).__name__,
                     slot_mapping=describe_tensor(getattr(first, "slot_mapping", None)),
                     kwargs=sorted(kwargs))

    def wait_for_layer_load(self, layer_name: str) -> None:
        self._record("wait_for_layer_load", layer=layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor,
                      attn_metadata: "AttentionMetadata", **kwargs: Any) -> None:
        slots = getattr(attn_metadata, "slot_mapping", None)
        self._record("save_kv_layer", layer=layer_name, kv_layer=describe_tensor(kv_layer),
                     attn_metadata=type(attn_metadata).__name__, slot_mapping=describe_tensor(slots),
                     written=digest_written(kv_layer, slots) if self._digests else None)

    def wait_for_save(self) -> None:
        self._record("wait_for_save", metadata=_describe_metadata(self._connector_metadata))

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if finished_req_ids:
            self._record("get_finished", finished_req_ids=sorted(finished_req_ids))
        else:
            self.calls["get_finished"] += 1
        return None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        self.calls["get_block_ids_with_load_errors"] += 1
        return set()

    def shutdown(self) -> None:
        self._record("shutdown", calls=dict(self.calls))
        self._recorder.close()

    # ---- scheduler side ----------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: "Request",
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        info = request_info(request)
        self._record("get_num_new_matched_tokens", num_computed_tokens=num_computed_tokens,
                     request=describe_request(request),
                     info={"num_tokens": len(info.token_ids), "seed": info.seed.hex(),
                           "lookup": info.lookup, "store": info.store})
        return 0, False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        self._record("update_state_after_alloc", request_id=request.request_id,
                     block_ids=[list(g) for g in blocks.get_block_ids()],
                     num_external_tokens=num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        self._step += 1
        summary = describe_scheduler_output(scheduler_output)
        view = step_view(scheduler_output)
        self._record("build_connector_meta", step=self._step, scheduler_output=summary,
                     view=[[r.request_id, r.block_ids, r.replace_blocks, r.num_computed_tokens,
                            r.num_scheduled_tokens] for r in view.requests],
                     view_preempted=sorted(view.preempted), view_finished=sorted(view.finished))
        meta = RecordingMetadata(step=self._step)
        for new in scheduler_output.scheduled_new_reqs:
            meta.block_ids[new.req_id] = [list(g) for g in new.block_ids]
        cached = scheduler_output.scheduled_cached_reqs
        for req_id, new_ids in zip(cached.req_ids, cached.new_block_ids):
            if new_ids is not None:
                meta.block_ids[req_id] = [list(g) for g in new_ids]
        return meta

    def update_connector_output(self, connector_output: "KVConnectorOutput") -> None:
        self._record("update_connector_output", output=describe_output(connector_output))

    def request_finished(self, request: "Request",
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._record("request_finished", request=describe_request(request), block_ids=list(block_ids))
        return False, None

    def take_events(self):
        self.calls["take_events"] += 1
        return ()


def _describe_metadata(meta: KVConnectorMetadata | None) -> dict[str, Any] | None:
    if meta is None:
        return None
    if isinstance(meta, RecordingMetadata):
        return {"type": "RecordingMetadata", "step": meta.step, "block_ids": meta.block_ids}
    return {"type": type(meta).__name__}


def cpu_attention_isa(vllm_config: "VllmConfig") -> str:
    """The vLLM-CPU attention ISA of this engine's MHA layers ("vec", "vec16", "amx", "neon"...):
    it fixes the byte order inside a KV block (see worker.py), so it is part of the model key.
    Uses vLLM-CPU's own choice function; on another platform, the platform's name."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return str(current_platform.device_type)
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    model = vllm_config.model_config
    return _get_attn_isa(model.dtype, vllm_config.cache_config.block_size, model.get_head_size(),
                         str(vllm_config.cache_config.cache_dtype))
