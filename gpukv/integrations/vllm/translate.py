"""vLLM objects -> the planner's plain values (duck-typed on vLLM 0.32's field names, so it is
testable without vLLM). The fields read: ``vllm/v1/request.py`` (``Request.all_token_ids``,
``cache_salt``, ``lora_request``, ``mm_features``, ``prompt_embeds``,
``skip_reading_prefix_cache``) and ``vllm/v1/core/sched/output.py`` (``SchedulerOutput``:
``scheduled_new_reqs``, ``scheduled_cached_reqs``, ``num_scheduled_tokens``,
``preempted_req_ids``, ``finished_req_ids``).

- :func:`request_info`: a ``vllm.v1.request.Request`` -> :class:`RequestInfo` (live token view,
  seed from ``cache_salt`` and ``lora_request``, multimodal items from ``mm_features``).
- :func:`step_view`: a ``SchedulerOutput`` -> :class:`StepView` (block tables: one list per KV
  cache group).
- :func:`engine_model_key`: a ``VllmConfig`` and a pipeline stage -> the gpukv model name,
  identical in EngineCore and in every worker of that stage (all of them hold the same config);
  :func:`cpu_attention_isa` and :func:`tp_rank` ask vLLM itself (imported when called).
"""

from __future__ import annotations

from typing import Any, Callable

from gpukv.integrations.vllm.keys import MMItem, model_key, request_seed
from gpukv.integrations.vllm.plan import RequestInfo, ScheduledRequest, StepView
from gpukv.integrations.vllm.topology import Stage


def request_info(request: Any) -> RequestInfo:
    """The planner's view of a vLLM ``Request``. Prompt embeddings are never looked up nor
    stored (their KV does not follow from token ids); ``skip_reading_prefix_cache`` requests
    are stored but not looked up."""
    lora = getattr(request, "lora_request", None)
    seed = request_seed(cache_salt=getattr(request, "cache_salt", None),
                        lora_name=getattr(lora, "lora_name", None) if lora else None,
                        lora_path=getattr(lora, "lora_path", None) if lora else None)
    items = tuple(MMItem(str(f.identifier), int(f.mm_position.offset), int(f.mm_position.length))
                  for f in (getattr(request, "mm_features", None) or ()))
    embeds = getattr(request, "prompt_embeds", None) is not None
    skip_read = bool(getattr(request, "skip_reading_prefix_cache", False))
    return RequestInfo(request.request_id, request.all_token_ids, seed=seed, mm_items=items,
                       lookup=not (embeds or skip_read), store=not embeds)


def group_blocks(block_ids: Any) -> tuple[list[int], ...] | None:
    """vLLM's block ids (one sequence per KV cache group) as lists; None stays None."""
    return None if block_ids is None else tuple(list(ids) for ids in block_ids)


def step_view(scheduler_output: Any) -> StepView:
    """The planner's view of one ``SchedulerOutput``."""
    scheduled = scheduler_output.num_scheduled_tokens
    requests = [ScheduledRequest(r.req_id, group_blocks(r.block_ids), True, r.num_computed_tokens,
                                 scheduled.get(r.req_id, 0))
                for r in scheduler_output.scheduled_new_reqs]
    cached = scheduler_output.scheduled_cached_reqs
    for rid, new_ids, computed in zip(cached.req_ids, cached.new_block_ids, cached.num_computed_tokens):
        requests.append(ScheduledRequest(rid, group_blocks(new_ids), rid in cached.resumed_req_ids,
                                         computed, scheduled.get(rid, 0)))
    return StepView(requests, preempted=frozenset(scheduler_output.preempted_req_ids or ()),
                    finished=frozenset(scheduler_output.finished_req_ids))


def engine_model_key(vllm_config: Any, *, attention: Callable[[], str], stage: Stage | None = None) -> str:
    """The gpukv model name of an engine (of one of its pipeline stages). ``attention()`` names
    what fixes the in-block byte order (on vLLM-CPU: the attention ISA for MHA); it is not called
    for MLA models."""
    model, cache, parallel = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    kind = "mla" if getattr(model, "use_mla", False) else "mha"
    return model_key(model=str(model.model), revision=getattr(model, "revision", None),
                     dtype=str(model.dtype).removeprefix("torch."), cache_dtype=str(cache.cache_dtype),
                     kind=kind, block_size=int(cache.block_size),
                     tp_size=int(parallel.tensor_parallel_size),
                     attention="mla-rows" if kind == "mla" else attention(),
                     stage=stage.tag if stage is not None else "")


def tp_rank(parallel: Any) -> int:
    """This worker's tensor-parallel rank (vLLM's process group once it is set up)."""
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank, model_parallel_is_initialized

    if model_parallel_is_initialized():
        return int(get_tensor_model_parallel_rank())
    return int(parallel.rank) % int(parallel.tensor_parallel_size)


def cpu_attention_isa(vllm_config: Any) -> str:
    """The vLLM-CPU attention ISA of this engine's MHA layers ("vec", "vec16", "amx", "neon"...):
    it fixes the byte order inside a KV block (see :mod:`.layouts`), so it is part of the model key.
    Uses vLLM-CPU's own choice function; on another platform, the platform's name."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return str(current_platform.device_type)
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    model = vllm_config.model_config
    return _get_attn_isa(model.dtype, vllm_config.cache_config.block_size, model.get_head_size(),
                         str(vllm_config.cache_config.cache_dtype))
