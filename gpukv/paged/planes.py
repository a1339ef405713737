"""Planes: each (layer, K/V) of a :class:`~gpukv.paged.layout.PagedKV` as a strided byte view.

A plane view is ``[num_blocks, block_size, num_heads, head_bytes]`` uint8 over the pages' own
memory (no copy), built from the descriptor's base addresses and byte strides, so it reads exactly
what the kernels read. The torch copy path and the perf baselines use them; they are built once
per cache (:meth:`PagedKV.cached`).
"""

from __future__ import annotations

import torch

from gpukv.paged.layout import PagedKV


def plane_tensor(paged: PagedKV, layer: int, kv: int) -> torch.Tensor:
    """The tensor given to :meth:`PagedKV.from_tensors` that holds plane ``(layer, kv)``."""
    if len(paged.tensors) == paged.num_layers:
        return paged.tensors[layer]
    return paged.tensors[kv * paged.num_layers + layer]  # SGLang MHA: K layers, then V layers


def plane_views(paged: PagedKV) -> tuple[torch.Tensor, ...]:
    """Per plane, layer-major (index ``layer * num_kv + kv``): a uint8 view
    ``[num_blocks, block_size, num_heads, head_bytes]`` of the pages (writes go to the cache)."""
    return paged.cached("plane_views", lambda: tuple(
        _plane_view(paged, layer, kv) for layer in range(paged.num_layers) for kv in range(paged.num_kv)))


def _plane_view(paged: PagedKV, layer: int, kv: int) -> torch.Tensor:
    storage = plane_tensor(paged, layer, kv).untyped_storage()
    raw = torch.empty(0, dtype=torch.uint8, device=paged.device).set_(storage)
    return torch.as_strided(
        raw, (paged.num_blocks, paged.block_size, paged.num_heads, paged.head_bytes),
        (paged.stride_block_bytes, paged.stride_token_bytes, paged.stride_head_bytes, 1),
        paged.base_ptrs[layer][kv] - storage.data_ptr())
