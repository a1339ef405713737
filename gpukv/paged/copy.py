"""pack / unpack: move full token chunks between a paged KV cache and the L1 arena.

One call covers every layer (or a contiguous range of layers), K/V and chunk. Three backends
behind one call:

* ``"triton"``: the kernel in ``gpukv_kernels.paged_copy`` (compiled on CUDA; on CPU tensors only
  under ``TRITON_INTERPRET=1``, which tests use), through :mod:`gpukv.paged.copy_triton`;
* ``"torch"``: a fast CPU path (one unit-row gather/scatter per plane, straight into the arena;
  see :mod:`gpukv.paged.copy_torch`);
* ``"ref"``: the kernel's plain-torch reference ``paged_copy_ref``, which tests check both against.

Auto choice: ``triton`` for CUDA tensors, ``torch`` otherwise; ``GPUKV_BACKEND`` or the
``backend`` argument forces one. Every argument is validated before any byte is written. On CUDA
the copy is queued on the current stream of the pages' device and the call returns without
waiting for it (the caller fences it: :class:`gpukv.paged.staging.Fence`).
"""

from __future__ import annotations

import os
from typing import Sequence, Union

import torch

from gpukv.paged.layout import PagedKV
from gpukv.paged.staging import on_device, to_device

OFFSET_ALIGN = 16
BACKENDS = ("triton", "torch", "ref")

Offsets = Union[torch.Tensor, Sequence[int]]
LayerRange = Union[None, tuple, range]


def pack(paged: PagedKV, slot_mapping: torch.Tensor, arena: torch.Tensor, offsets: Offsets, *,
         chunk_size: int = 256, backend: str | None = None, layers: LayerRange = None,
         sm_budget: int | None = None) -> None:
    """Copy ``len(offsets)`` chunks out of the pages into ``arena``.

    slot_mapping: 1-D int64/int32, ``len(offsets) * chunk_size`` page slots
                  (``slot = block * block_size + offset``), ``-1`` = skip that token.
    arena:        1-D uint8 tensor on the cache's device (the L1's memory).
    offsets:      byte offsets of the chunks in ``arena``: multiples of 16, non-overlapping, each
                  chunk ``paged.chunk_bytes(chunk_size)`` long, in the chunk format
                  ``[num_layers, num_kv, chunk_size, row_bytes]``.
    layers:       None (all), ``(start, stop)`` or ``range(start, stop)``: only those layers of
                  each chunk move (bytes ``start * layer_bytes .. stop * layer_bytes`` of each
                  chunk); ``offsets`` still point at chunk starts, every other byte is untouched.
    sm_budget:    (Triton) the most SMs the launch keeps busy; None: all of them. A copy queued on
                  the model's own stream runs between its kernels anyway: give it the whole GPU
                  (the default); a copy on a side stream, beside the model, takes a budget.
    """
    _run(paged, slot_mapping, arena, offsets, chunk_size, backend, layers, sm_budget, pack=True)


def unpack(paged: PagedKV, slot_mapping: torch.Tensor, arena: torch.Tensor, offsets: Offsets, *,
           chunk_size: int = 256, backend: str | None = None, layers: LayerRange = None,
           sm_budget: int | None = None) -> None:
    """Copy chunks from ``arena`` back into the pages; the arguments mean what they do in :func:`pack`."""
    _run(paged, slot_mapping, arena, offsets, chunk_size, backend, layers, sm_budget, pack=False)


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend a call uses: ``backend``, else ``$GPUKV_BACKEND``, else by device."""
    choice = backend or os.environ.get("GPUKV_BACKEND") or None
    if choice is None:
        return "triton" if device.type == "cuda" else "torch"
    if choice not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {choice!r}")
    if choice == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton "
                         "is imported; use backend 'torch' on CPU")
    return choice


def layer_range(paged: PagedKV, layers: LayerRange) -> tuple[int, int] | None:
    """``layers`` as a validated ``(start, stop)`` with ``0 <= start < stop <= num_layers``, or
    None for all layers."""
    if layers is None:
        return None
    if isinstance(layers, range):
        if layers.step != 1:
            raise ValueError(f"layers must be a contiguous range (step 1), got {layers!r}")
        start, stop = layers.start, layers.stop
    elif isinstance(layers, tuple) and len(layers) == 2:
        start, stop = layers
    else:
        raise ValueError(f"layers must be None, (start, stop) or a range, got {layers!r:.80}")
    if any(not isinstance(v, int) or isinstance(v, bool) for v in (start, stop)):
        raise ValueError(f"layers must hold ints, got {layers!r:.80}")
    if not 0 <= start < stop <= paged.num_layers:
        raise ValueError(f"layers {layers!r} is not a non-empty range inside [0, {paged.num_layers}) "
                         f"(the cache has {paged.num_layers} layers)")
    return None if (start, stop) == (0, paged.num_layers) else (start, stop)


def _run(paged: PagedKV, slot_mapping, arena, offsets, chunk_size, backend, layers, sm_budget, *,
         pack: bool) -> None:
    slots, offs = validate(paged, slot_mapping, arena, offsets, chunk_size)
    span = layer_range(paged, layers)
    choice = resolve_backend(backend, paged.device)
    if offs.numel() == 0:
        return
    with on_device(paged.device):  # the launch, and the copies it reads, on the pages' device
        slots = to_device(slots, paged.device)
        if choice == "torch":  # (reads its offsets on the host)
            from gpukv.paged import copy_torch

            fn = copy_torch.pack_torch if pack else copy_torch.unpack_torch
            fn(paged, slots, arena, offs, chunk_size=chunk_size, layers=span)
        else:
            from gpukv.paged.copy_triton import copy_kernel

            copy_kernel(paged, slots, arena, to_device(offs, paged.device), chunk_size=chunk_size,
                        layers=span, pack=pack, ref=choice == "ref", sm_budget=sm_budget)


def validate(paged: PagedKV, slot_mapping, arena, offsets, chunk_size) -> tuple[torch.Tensor, torch.Tensor]:
    """Check every argument; returns (slots as contiguous int64, where the caller had them;
    offsets as CPU int64). On CUDA a slot mapping given on the CPU is checked there and reaches
    the GPU without blocking the host (:mod:`gpukv.paged.staging`); one given on the GPU costs
    a host sync for the range check."""
    if not isinstance(paged, PagedKV):
        raise ValueError(f"paged must be a PagedKV, got {type(paged).__name__}")
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if not isinstance(arena, torch.Tensor) or arena.dtype != torch.uint8 or arena.dim() != 1:
        desc = f"{tuple(arena.shape)} {arena.dtype}" if isinstance(arena, torch.Tensor) else type(arena).__name__
        raise ValueError(f"arena must be a 1-D uint8 tensor, got {desc}")
    if not arena.is_contiguous():
        raise ValueError(f"arena must be contiguous, got stride {arena.stride()}")
    if arena.device != paged.device:
        raise ValueError(f"arena is on {arena.device}, the paged cache on {paged.device}")
    offs = _offsets_list(offsets, paged.device)  # a few ints: checked in Python, no tensor ops
    n = len(offs)
    chunk_bytes = paged.chunk_bytes(chunk_size)
    for off in offs:
        if off % OFFSET_ALIGN:
            raise ValueError(f"offset {off} is not a multiple of {OFFSET_ALIGN}")
    if n:
        lo, hi = min(offs), max(offs)
        if lo < 0 or hi + chunk_bytes > arena.numel():
            bad = lo if lo < 0 else hi
            raise ValueError(f"offset {bad} + chunk_bytes {chunk_bytes} runs past the arena "
                             f"({arena.numel()} bytes)")
        srt = sorted(offs)
        for a, b in zip(srt, srt[1:]):
            if b - a < chunk_bytes:
                raise ValueError(f"offsets {a} and {b} overlap (chunks are {chunk_bytes} bytes)")
    check_slot_mapping(paged, slot_mapping, n * chunk_size,
                       f"len(offsets) * chunk_size = {n} * {chunk_size} = {n * chunk_size}")
    slots = slot_mapping.to(dtype=torch.int64).contiguous()
    return slots, torch.tensor(offs, dtype=torch.int64)


def check_slot_mapping(paged: PagedKV, slot_mapping, num_entries: int, expected: str) -> None:
    """A slot mapping fits ``paged``: 1-D int32/int64, ``num_entries`` long (``expected`` says
    why, for the message), on the CPU or the cache's device, every entry in ``[-1, num_slots)``."""
    if not isinstance(slot_mapping, torch.Tensor):
        raise ValueError(f"slot_mapping must be a torch.Tensor, got {type(slot_mapping).__name__}")
    if slot_mapping.dim() != 1 or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be 1-D int64 or int32, got shape "
                         f"{tuple(slot_mapping.shape)} dtype {slot_mapping.dtype}")
    if slot_mapping.numel() != num_entries:
        raise ValueError(f"slot_mapping has {slot_mapping.numel()} entries, expected {expected}")
    if slot_mapping.device.type not in ("cpu", paged.device.type):
        raise ValueError(f"slot_mapping is on {slot_mapping.device}, the paged cache on {paged.device}")
    if num_entries:
        smin, smax = torch.stack(torch.aminmax(slot_mapping)).tolist()  # one sync on a GPU
        if smin < -1:
            raise ValueError(f"slot_mapping entry {smin} is below -1")
        if smax >= paged.num_slots:
            raise ValueError(f"slot_mapping entry {smax} is past the cache ({paged.num_slots} slots = "
                             f"{paged.num_blocks} blocks x {paged.block_size})")


def _offsets_list(offsets: Offsets, device: torch.device) -> list[int]:
    if isinstance(offsets, torch.Tensor):
        if offsets.dim() != 1 or offsets.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"offsets must be a 1-D int64 tensor, got shape {tuple(offsets.shape)} "
                             f"dtype {offsets.dtype}")
        if offsets.device.type not in ("cpu", device.type):
            raise ValueError(f"offsets is on {offsets.device}, the paged cache on {device}")
        return offsets.tolist()
    try:
        items = list(offsets)
        values = [int(o) for o in items]
    except (TypeError, ValueError):
        raise ValueError(f"offsets must be a 1-D tensor or a sequence of ints, got {offsets!r:.80}") from None
    if any(isinstance(o, bool) or v != o for o, v in zip(items, values)):
        raise ValueError(f"offsets must be integers, got {items!r:.80}")
    return values
