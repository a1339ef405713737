"""Tiny random-weight models saved as local Hugging Face folders that vLLM-CPU can serve.

No hub access: the weights come from :mod:`gpukv.integrations.transformers`' seeded builders and
are written with ``save_pretrained`` (safetensors + config.json). By default there is no
tokenizer: run vLLM with ``skip_tokenizer_init=True`` and prompts as token ids
(``{"prompt_token_ids": [...]}``), see :func:`prompt_token_ids`. ``tokenizer=True`` also writes
a word-level tokenizer built offline with the ``tokenizers`` library (:func:`write_tokenizer`):
token ``i`` is the word ``t<i>`` (fixed width), so any id sequence decodes to text that encodes
back to exactly the same ids -- what an OpenAI server and ``vllm bench serve``'s datasets need.

- ``tiny-llama``: 3 layers, 4 query heads, 2 KV heads of 32 (head size 32 is one of vLLM-CPU's
  ``CPU_ATTN`` sizes), vocab 512. KV per token: 3 x 2 x 2 x 32 x 2 B = 768 B in bf16.
- ``tiny-deepseek``: DeepSeek-V3 with MLA, 3 layers (1 dense + 2 MoE, 4 routed experts, top 2),
  4 heads, latent 512 + RoPE 64 = 576 (the only row ``CPU_MLA`` accepts). KV per token:
  3 x 576 x 4 B = 6912 B in fp32.

Both are small enough that an engine starts in well under a minute on 2 cores. The weights'
``initializer_range`` is larger than transformers' 0.02 (Llama 0.3, DeepSeek 0.1): at 0.02 both
models repeat one to three tokens whatever the context, so a test comparing greedy tokens could not
tell a used cache from a wrong one; at these values the tokens change when an early prompt token
changes, and the top-1/top-2 logit margins of the first steps are ~0.27 (Llama) and ~0.07
(DeepSeek) on a 300-token random prompt, measured with transformers in fp32.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

TINY_LLAMA: dict[str, Any] = dict(vocab_size=512, hidden_size=128, intermediate_size=256,
                                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=4096, tie_word_embeddings=False,
                                  initializer_range=0.3)
TINY_DEEPSEEK: dict[str, Any] = dict(vocab_size=512, hidden_size=128, intermediate_size=256,
                                     moe_intermediate_size=64, num_hidden_layers=3,
                                     num_attention_heads=4, num_key_value_heads=4,
                                     n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2,
                                     n_group=1, topk_group=1, first_k_dense_replace=1,
                                     kv_lora_rank=512, q_lora_rank=64, qk_rope_head_dim=64,
                                     qk_nope_head_dim=32, v_head_dim=32,
                                     max_position_embeddings=4096, tie_word_embeddings=False,
                                     initializer_range=0.1,
                                     # transformers' router is always sigmoid + correction bias;
                                     # vLLM builds that bias only when the config says so
                                     topk_method="noaux_tc", scoring_func="sigmoid")
MODELS = {"tiny-llama": ("tiny_llama", TINY_LLAMA, torch.bfloat16),
          "tiny-deepseek": ("tiny_deepseek", TINY_DEEPSEEK, torch.float32)}
_STAMP = "gpukv-tiny-model.json"


def write_tiny_model(name: str, folder: str | os.PathLike, *, seed: int = 0,
                     dtype: torch.dtype | None = None, tokenizer: bool = False, **overrides: Any) -> Path:
    """Write model ``name`` ("tiny-llama" or "tiny-deepseek") into ``folder``; return its path.

    ``dtype`` defaults to bf16 for the Llama and fp32 for the DeepSeek (bf16 MLA greedy tokens are
    too fragile to compare). ``overrides`` go to the transformers config. ``tokenizer``: also
    write :func:`write_tokenizer`'s tokenizer for the model's vocabulary. Idempotent: a folder
    already holding the same recipe (name, seed, dtype, overrides, tokenizer) is left as it is.
    """
    from gpukv.integrations import transformers as adapter

    if name not in MODELS:
        raise ValueError(f"unknown tiny model {name!r}; expected one of {sorted(MODELS)}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    builder, config, default_dtype = MODELS[name]
    dtype = default_dtype if dtype is None else dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    path = Path(folder)
    recipe = {"name": name, "seed": seed, "dtype": str(dtype), "config": {**config, **overrides}}
    if tokenizer:
        recipe["tokenizer"] = "word-level-v1"
    stamp = path / _STAMP
    if stamp.is_file() and json.loads(stamp.read_text()) == recipe:
        return path
    model = getattr(adapter, builder)(seed, dtype=dtype, **{**config, **overrides})
    model.config.dtype = dtype
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer:
        write_tokenizer(path, int(model.config.vocab_size))
    stamp.write_text(json.dumps(recipe, sort_keys=True))
    return path


def write_tokenizer(folder: str | os.PathLike, vocab_size: int) -> Path:
    """A word-level tokenizer of ``vocab_size`` words (id ``i`` is ``t<i>``, zero-padded to one
    width, e.g. ``t002``: no word is a prefix of another, so the special words cannot match inside
    others), split on whitespace, saved as ``tokenizer.json`` and ``tokenizer_config.json`` in
    ``folder`` for transformers' ``AutoTokenizer`` (hence vLLM). ``decode`` joins words with
    single spaces, so ``encode(decode(ids)) == ids`` for any ids below ``vocab_size``. End of
    sequence: id 2 (the tiny models' ``eos_token_id``), beginning: id 1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 4:
        raise ValueError(f"vocab_size must be an int >= 4, got {vocab_size!r}")
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    width = len(str(vocab_size - 1))
    vocab = {f"t{i:0{width}d}": i for i in range(vocab_size)}
    word = {i: f"t{i:0{width}d}" for i in (0, 1, 2)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=word[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": word[2], "bos_token": word[1],
        "unk_token": word[0], "clean_up_tokenization_spaces": False, "model_max_length": 1 << 20}))
    return path


def prompt_token_ids(num_tokens: int, *, seed: int, vocab_size: int = 512,
                     prefix: list[int] | None = None) -> list[int]:
    """``num_tokens`` random token ids (``prefix`` first, then seeded random ids in
    ``[1, vocab_size)``), for ``LLM.generate({"prompt_token_ids": ...})``."""
    prefix = list(prefix or [])
    if not isinstance(num_tokens, int) or num_tokens < len(prefix):
        raise ValueError(f"num_tokens={num_tokens!r} must be an int >= len(prefix)={len(prefix)}")
    gen = torch.Generator().manual_seed(seed)
    tail = torch.randint(1, vocab_size, (num_tokens - len(prefix),), generator=gen)
    return prefix + tail.tolist()
