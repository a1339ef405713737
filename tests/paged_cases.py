"""Builders of small paged KV caches in every supported layout, filled with random bit patterns."""

from __future__ import annotations

import torch

from gpukv.paged.layout import PagedKV
from gpukv.paged.planes import plane_views

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
          "fp8": torch.float8_e4m3fn, "u8": torch.uint8}

# name -> (dims, kind, physical builder(num_blocks, block_size, heads, head_dim) -> logical shape tensor)
LAYOUTS = ["kv_first", "kv_first_hnd", "blocks_first", "flashinfer_hnd", "packed", "mla",
           "sglang_mha", "sglang_mla"]


def random_bits(shape, dtype, gen: torch.Generator) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype)
    t.view(torch.uint8).copy_(torch.randint(0, 256, t.view(torch.uint8).shape, dtype=torch.uint8, generator=gen))
    return t


def make_cache(layout: str, *, dtype=torch.bfloat16, num_layers=3, num_blocks=6, block_size=16,
               heads=2, head_dim=8, seed=0):
    """Returns (layers argument, dims, kind) for PagedKV.from_tensors."""
    gen = torch.Generator().manual_seed(seed)
    nb, bs, h, d = num_blocks, block_size, heads, head_dim
    L = num_layers
    if layout == "kv_first":
        return [random_bits((2, nb, bs, h, d), dtype, gen) for _ in range(L)], "2,NB,BS,H,D", "mha"
    if layout == "kv_first_hnd":  # physical [2, NB, H, BS, D], logical 2,NB,BS,H,D
        return ([random_bits((2, nb, h, bs, d), dtype, gen).permute(0, 1, 3, 2, 4) for _ in range(L)],
                "2,NB,BS,H,D", "mha")
    if layout == "blocks_first":
        return [random_bits((nb, 2, bs, h, d), dtype, gen) for _ in range(L)], "NB,2,BS,H,D", "mha"
    if layout == "flashinfer_hnd":  # physical [NB, 2, H, BS, D]
        return ([random_bits((nb, 2, h, bs, d), dtype, gen).permute(0, 1, 3, 2, 4) for _ in range(L)],
                "NB,2,BS,H,D", "mha")
    if layout == "packed":
        return [random_bits((nb, h, bs, 2 * d), dtype, gen) for _ in range(L)], "NB,H,BS,2D", "mha"
    if layout == "mla":
        return [random_bits((nb, bs, h * d), dtype, gen) for _ in range(L)], "NB,BS,D", "mla"
    if layout == "sglang_mha":
        k = [random_bits((nb * bs, h, d), dtype, gen) for _ in range(L)]
        v = [random_bits((nb * bs, h, d), dtype, gen) for _ in range(L)]
        return (k, v), "S,H,D", "mha"
    if layout == "sglang_mla":
        return [random_bits((nb * bs, 1, h * d), dtype, gen) for _ in range(L)], "S,H,D", "mla"
    raise ValueError(layout)


def clone_layers(layers):
    if isinstance(layers, tuple):
        return tuple(clone_layers(x) for x in layers)
    return [t.clone() if t.is_contiguous() else _clone_strided(t) for t in layers]


def _clone_strided(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t``'s whole storage (padding included), viewed with ``t``'s strides."""
    storage = _bytes(t).clone()
    return torch.as_strided(storage.view(t.dtype), t.shape, t.stride(), t.storage_offset())


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """All bytes of a (possibly permuted, dense) tensor's storage span as a flat uint8 tensor."""
    return torch.as_strided(t, (t.untyped_storage().nbytes() // t.element_size(),), (1,), 0).view(torch.uint8)


def storages(layers) -> list[torch.Tensor]:
    """Writable flat uint8 views of every layer tensor's storage."""
    if isinstance(layers, tuple):
        return [b for part in layers for b in storages(part)]
    return [_bytes(t) for t in layers]


def flat_bytes(layers) -> list[torch.Tensor]:
    """Every layer tensor's storage bytes (for snapshots and bit-exact comparisons)."""
    if isinstance(layers, tuple):
        return [b for part in layers for b in flat_bytes(part)]
    return [_bytes(t).clone() for t in layers]


def token_rows(paged: PagedKV, slots: torch.Tensor) -> torch.Tensor:
    """``[num_layers, num_kv, len(slots), row_bytes]`` bytes of the given slots (a copy)."""
    planes = plane_views(paged)
    rows = [p[slots // paged.block_size, slots % paged.block_size].reshape(len(slots), -1) for p in planes]
    return torch.stack(rows).view(paged.num_layers, paged.num_kv, len(slots), -1)
