"""The adapter from a :class:`PagedKV` to the raw arguments of ``gpukv_kernels.paged_copy``.

``gpukv_kernels`` takes an address table, slots, offsets, the arena and plain ints; this module
builds them from the descriptor (the device address table once per cache, see
:meth:`PagedKV.cached`) and runs the Triton kernel (backend "triton") or its plain-torch
reference ``paged_copy_ref`` (backend "ref"). Arguments are validated by
:mod:`gpukv.paged.copy`; the kernel's launcher checks ranks, dtypes and alignment again.
"""

from __future__ import annotations

import torch

from gpukv.paged.layout import PagedKV, word_bytes


def address_table(paged: PagedKV) -> torch.Tensor:
    """int64 ``[num_layers * num_kv]`` on the cache's device: each plane's base address,
    layer-major (built once per cache)."""
    return paged.cached("address_table", lambda: torch.tensor(
        [p for row in paged.base_ptrs for p in row], dtype=torch.int64, device=paged.device))


def kernel_args(paged: PagedKV, arena: torch.Tensor, chunk_size: int,
                layers: tuple[int, int] | None) -> dict:
    """Keyword arguments of ``paged_copy`` / ``paged_copy_ref`` besides the four tensors."""
    start, stop = layers or (0, paged.num_layers)
    return dict(num_blocks=paged.num_blocks, block_size=paged.block_size, chunk_size=chunk_size,
                num_kv=paged.num_kv, num_heads=paged.num_heads, head_bytes=paged.head_bytes,
                stride_block=paged.stride_block_bytes, stride_token=paged.stride_token_bytes,
                stride_head=paged.stride_head_bytes, layer_start=start, layer_stop=stop,
                word_bytes=word_bytes(paged.word_bytes, arena.data_ptr()))


def copy_kernel(paged: PagedKV, slots: torch.Tensor, arena: torch.Tensor, offsets: torch.Tensor, *,
                chunk_size: int, layers: tuple[int, int] | None, pack: bool, ref: bool = False) -> None:
    """Pack (``pack=True``) or unpack validated arguments in one launch (``ref``: the reference)."""
    from gpukv_kernels.paged_copy import paged_copy, paged_copy_ref

    fn = paged_copy_ref if ref else paged_copy
    fn(address_table(paged), slots, offsets, arena, pack=pack,
       **kernel_args(paged, arena, chunk_size, layers))
