"""The adapter from a :class:`PagedKV` to the raw arguments of ``gpukv_kernels.paged_copy``.

``gpukv_kernels`` takes an address table, slots, offsets, the arena and plain ints; this module
builds them from the descriptor (the device address table and the pages' alignment once per
cache, see :meth:`PagedKV.cached`) and runs the Triton kernel (backend "triton") or its
plain-torch reference ``paged_copy_ref`` (backend "ref"). Arguments are validated by
:mod:`gpukv.paged.copy`; the kernel's launcher checks ranks, dtypes and alignment again.

Alignment: the kernel moves 16-byte vectors where the head size, the strides, every plane's
base address, the arena's address and the offsets (multiples of ``OFFSET_ALIGN``) all allow it,
else the widest integer word that divides them all.
"""

from __future__ import annotations

import torch

from gpukv.paged.layout import PagedKV
from gpukv.paged.staging import to_device
from gpukv_kernels.paged_copy_plan import DEFAULT_SM_BUDGET  # plain Python: imports no triton

VECTOR_BYTES = 16


def address_table(paged: PagedKV) -> torch.Tensor:
    """int64 ``[num_layers * num_kv]`` on the cache's device: each plane's base address,
    layer-major (built once per cache)."""
    return paged.cached("address_table", lambda: torch.tensor(
        [p for row in paged.base_ptrs for p in row], dtype=torch.int64, device=paged.device))


def alignment(*values: int) -> int:
    """The widest of 16/8/4/2/1 bytes dividing every value (sizes, strides, addresses)."""
    for w in (VECTOR_BYTES, 8, 4, 2):
        if all(v % w == 0 for v in values):
            return w
    return 1


def kernel_word_bytes(paged: PagedKV, arena: torch.Tensor) -> int:
    """The ``word_bytes`` the kernel may use between ``paged`` and ``arena``."""
    from gpukv.paged.copy import OFFSET_ALIGN  # here: copy.py imports this module

    pages = paged.cached("kernel_alignment", lambda: alignment(
        paged.head_bytes, paged.stride_block_bytes, paged.stride_token_bytes,
        paged.stride_head_bytes, *(p for row in paged.base_ptrs for p in row)))
    return alignment(pages, arena.data_ptr(), OFFSET_ALIGN)


def kernel_args(paged: PagedKV, arena: torch.Tensor, chunk_size: int,
                layers: tuple[int, int] | None) -> dict:
    """Keyword arguments of ``paged_copy`` / ``paged_copy_ref`` besides the four tensors."""
    start, stop = layers or (0, paged.num_layers)
    return dict(num_blocks=paged.num_blocks, block_size=paged.block_size, chunk_size=chunk_size,
                num_kv=paged.num_kv, num_heads=paged.num_heads, head_bytes=paged.head_bytes,
                stride_block=paged.stride_block_bytes, stride_token=paged.stride_token_bytes,
                stride_head=paged.stride_head_bytes, layer_start=start, layer_stop=stop,
                word_bytes=kernel_word_bytes(paged, arena))


def copy_kernel(paged: PagedKV, slots: torch.Tensor, arena: torch.Tensor, offsets: torch.Tensor, *,
                chunk_size: int, layers: tuple[int, int] | None, pack: bool, ref: bool = False,
                sm_budget: int | None = DEFAULT_SM_BUDGET) -> None:
    """Pack (``pack=True``) or unpack validated arguments in one launch (``ref``: the reference).
    ``sm_budget``: CTAs of the launch (at most that many SMs busy), None for every SM."""
    from gpukv_kernels.paged_copy import paged_copy, paged_copy_ref

    fn = paged_copy_ref if ref else paged_copy
    fn(address_table(paged), slots, to_device(offsets, arena.device), arena, pack=pack,
       sm_budget=sm_budget, **kernel_args(paged, arena, chunk_size, layers))
