"""Which vLLM parallel configurations the connector serves, and the key space of each pipeline stage.

- **Pipeline parallelism (PP)**: each stage's workers hold only its layers, so each stage gets a
  model key of its own, tagged with its layer range (:class:`Stage`): stage 1 can never "hit"
  stage 0's chunks, and an uneven split (vLLM's ``get_pp_indices``, or
  ``VLLM_PP_LAYER_PARTITION``) registers each stage's own layout. The scheduler (one per engine)
  looks up every stage's key and counts a chunk only where every stage holds it; each stage's
  workers load and store only their own objects. The scheduler and the workers compute the
  ranges with the same vLLM function from the same config, so they agree.
- **Decode / prefill context parallelism (DCP, PCP > 1)**: the scheduler's block spans
  ``block_size * dcp_size`` tokens spread over the ranks, and MLA latents are no longer replicated
  on every rank; gpukv does not key that yet, so the engine runs uncached (:func:`refusal`).
- KV cache groups gpukv does not store (SSM states and other kinds: :func:`.kv_groups.kv_groups`
  says why) and NVFP4 KV caches (FlashInfer stores K and V heads apart with block scales) are
  refused the same way.

A refused configuration never stops the engine: the connector logs one line naming it and does
nothing else. Nothing here imports vLLM at module level.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Stage:
    """One pipeline stage: ``index`` of ``size`` stages, holding layers ``[start_layer,
    end_layer)`` of the model."""

    index: int
    size: int
    start_layer: int
    end_layer: int

    def __post_init__(self) -> None:
        if not (0 <= self.index < self.size and 0 <= self.start_layer < self.end_layer):
            raise ValueError(f"bad pipeline stage {self.index}/{self.size} with layers "
                             f"[{self.start_layer}, {self.end_layer})")

    @property
    def tag(self) -> str:
        """Key material: empty without pipeline parallelism (keys stay those of a PP=1 engine)."""
        if self.size == 1:
            return ""
        return f"pp{self.index}of{self.size}:L{self.start_layer}-{self.end_layer}"


def pipeline_stages(vllm_config: Any) -> list[Stage]:
    """Every stage of the engine, in order, with vLLM's own layer split."""
    from vllm.distributed.utils import get_pp_indices

    size = int(vllm_config.parallel_config.pipeline_parallel_size)
    num_layers = int(vllm_config.model_config.get_total_num_hidden_layers())
    return [Stage(i, size, *get_pp_indices(num_layers, i, size)) for i in range(size)]


def worker_stage_index(parallel: Any) -> int:
    """This worker's pipeline stage (vLLM's process group once it is set up; the layout order is
    DP x PP x TP)."""
    from vllm.distributed.parallel_state import get_pp_group, model_parallel_is_initialized

    if model_parallel_is_initialized():
        return int(get_pp_group().rank_in_group)
    tp, pp = int(parallel.tensor_parallel_size), int(parallel.pipeline_parallel_size)
    return (int(parallel.rank) // tp) % pp


def refusal(vllm_config: Any, groups_refused: str | None = None) -> str | None:
    """Why gpukv cannot serve this engine correctly (one line naming the configuration), or
    None when it can; ``groups_refused``: why its KV cache groups cannot be served, if so."""
    parallel, cache = vllm_config.parallel_config, vllm_config.cache_config
    dcp = int(getattr(parallel, "decode_context_parallel_size", 1) or 1)
    pcp = int(getattr(parallel, "prefill_context_parallel_size", 1) or 1)
    if dcp > 1 or pcp > 1:
        return (f"context parallelism (decode_context_parallel_size={dcp}, "
                f"prefill_context_parallel_size={pcp}) shards each block's tokens over ranks, "
                "which gpukv does not key")
    if groups_refused is not None:
        return groups_refused
    cache_dtype = str(getattr(cache, "cache_dtype", ""))
    if cache_dtype.startswith("nvfp4"):
        return f"kv_cache_dtype={cache_dtype!r} (K and V heads apart, with block scales) has no gpukv layout"
    return None
