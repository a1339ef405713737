"""What makes two vLLM requests' KV differ beyond their tokens, as gpukv key material.

vLLM's own prefix cache (``vllm/v1/core/kv_cache_utils.py: generate_block_hash_extra_keys``) keys
a block on its tokens plus: the LoRA adapter (name and path), the request's ``cache_salt`` (first
block only, so it changes the whole chain), multimodal items overlapping the block (identifier and
offset in the block) and prompt-embedding hashes. gpukv mirrors that:

- ``seed`` (starts the chunk hash chain): cache_salt + LoRA name + LoRA path;
- ``extras`` (one bytes per chunk, mixed into that chunk's hash): the multimodal items overlapping
  the chunk, each as identifier and offset relative to the chunk start; ``None`` without any;
- requests with prompt embeddings are not cached at all (:func:`cacheable`);
- the model key: everything about the engine that changes the stored bytes (model, dtype, cache
  dtype, layout kind, block size, TP size, the CPU attention ISA, which fixes the in-block byte
  order, and under pipeline parallelism the stage's layer range) -- so engines that could not
  share bytes never share keys.

Pure functions on plain values; the connector extracts them from vLLM objects.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

LAYOUT_VERSION = 1  # bump when the connector changes how it registers or views vLLM's tensors


@dataclass(frozen=True, slots=True)
class MMItem:
    """One multimodal item of a prompt: vLLM's ``MultiModalFeatureSpec.identifier`` and its
    ``mm_position`` (``offset`` and ``length`` in tokens)."""

    identifier: str
    offset: int
    length: int


def _field(tag: bytes, value: str | None) -> bytes:
    data = b"" if value is None else value.encode("utf-8")
    # length-prefixed: ("ab", "c") and ("a", "bc") never collide
    return tag + len(data).to_bytes(4, "little") + data + (b"\x01" if value is not None else b"\x00")


def request_seed(*, cache_salt: str | None, lora_name: str | None, lora_path: str | None) -> bytes:
    """The hash-chain seed of a request; ``b""`` for a plain request (so plain requests of all
    engines with the same model key share chunks)."""
    for name, value in (("cache_salt", cache_salt), ("lora_name", lora_name), ("lora_path", lora_path)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{name} must be a str or None, got {value!r}")
    if cache_salt is None and lora_name is None and lora_path is None:
        return b""
    return b"vllm-seed\x00" + _field(b"salt", cache_salt) + _field(b"lora", lora_name) + _field(b"path", lora_path)


def chunk_extras(items: Sequence[MMItem], num_chunks: int, chunk_size: int) -> list[bytes] | None:
    """Per chunk, the multimodal items overlapping it (identifier, offset from the chunk start,
    length), or ``None`` when no item overlaps any of the ``num_chunks`` chunks."""
    if num_chunks < 0 or chunk_size <= 0:
        raise ValueError(f"need num_chunks >= 0 and chunk_size > 0, got {num_chunks}, {chunk_size}")
    out = [b""] * num_chunks
    for item in items:
        if item.length <= 0 or item.offset < 0:
            raise ValueError(f"multimodal item {item.identifier!r} has offset {item.offset}, "
                             f"length {item.length}")
        first = item.offset // chunk_size
        last = min(num_chunks - 1, (item.offset + item.length - 1) // chunk_size)
        for c in range(first, last + 1):
            out[c] += _field(b"mm", item.identifier) + (item.offset - c * chunk_size).to_bytes(
                8, "little", signed=True) + item.length.to_bytes(8, "little")
    return out if any(out) else None


def model_key(*, model: str, revision: str | None, dtype: str, cache_dtype: str, kind: str,
              block_size: int, tp_size: int, attention: str, stage: str = "") -> str:
    """The gpukv ``model`` name for one engine configuration: readable prefix + 12-hex digest.

    ``attention``: what fixes the byte order inside a block -- on vLLM-CPU the attention ISA
    (``"vec"``, ``"vec16"``, ``"amx"``, ``"neon"``...) for MHA, ``"mla-rows"`` for MLA.
    ``tp_size``: MHA shards differ per TP size; MLA latents are numerically TP-dependent too (the
    hidden states come through TP all-reduces), so they are keyed on it as well.
    ``stage``: a pipeline stage's tag (its layer range, :meth:`.topology.Stage.tag`), empty
    without pipeline parallelism: each stage's objects live in a key space of their own.
    """
    if kind not in ("mha", "mla"):
        raise ValueError(f"kind must be 'mha' or 'mla', got {kind!r}")
    for name, value in (("block_size", block_size), ("tp_size", tp_size)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    full = (f"v{LAYOUT_VERSION}|{model}|{revision or ''}|{dtype}|{cache_dtype}|{kind}|bs{block_size}"
            f"|tp{tp_size}|{attention}" + (f"|{stage}" if stage else ""))
    digest = hashlib.blake2b(full.encode("utf-8"), digest_size=6).hexdigest()
    base = model.rstrip("/").rsplit("/", 1)[-1] or "model"
    return f"vllm-{base}-{digest}"


def engine_group(engine_id: str, data_parallel_rank: int, override: str | None = None) -> str:
    """The gpukv group of one engine (its scheduler and its workers): ``override`` if given, else
    derived from vLLM's ``engine_id`` (one random uuid4 per engine, the same in all its processes)
    and the data-parallel rank. Not a secret: vLLM logs the engine id; the group keeps engines from
    touching each other's requests, the server's socket permissions keep other users out."""
    if override is not None:
        return override
    if not isinstance(engine_id, str) or not engine_id:
        raise ValueError(f"engine_id must be a non-empty str, got {engine_id!r}")
    return f"vllm-{engine_id}-dp{data_parallel_rank}"
