"""The layout table of the Triton copy kernel: real model rows in every engine layout gpukv serves.

One table for three users, so they agree on what "every layout" means:
  perf/sass_table.py        registers, spills and access widths from the cubin (CPU, no GPU)
  tests/test_kernels_sass.py  the same variants, asserted in CI
  perf/sweep_gpu_copy.py    GB/s against a device-to-device copy (on a GPU)

A :class:`Layout` is a model shape (perf/common.py ``MODELS`` plus the few rows only this table
needs) in one engine layout with one block size; :func:`build` allocates it as that engine does
(vLLM, FlashInfer, vLLM-CPU, SGLang) and returns what ``PagedKV.from_tensors`` takes.
Block sizes are 16 (vLLM's default), 64 (FlashMLA), 128, 1 (SGLang pools) and 48, which is not
a power of two (vLLM accepts such sizes; the kernel then divides in 32 bits instead of shifting).
``aligned`` says whether the kernel must use 16-byte vectors for it: every real layout is; the
``*-unaligned-*`` rows move a cache whose base address is only 8 or 2 bytes aligned (a view at an
odd storage offset) to keep the fallback path compiled and checked.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import MODELS  # noqa: E402

SHAPES = {**MODELS,
          "deepseek-v3-fp8": dict(kind="mla", num_layers=61, num_heads=1, head_dim=576,
                                  dtype=torch.float8_e4m3fn)}
ENGINES = {  # engine layout -> dims string for PagedKV.from_tensors
    "mla": "NB,BS,D", "mla_cpu": "NB,BS,D", "sglang_mla": "S,H,D",
    "kv_first": "2,NB,BS,H,D", "kv_first_hnd": "2,NB,BS,H,D", "blocks_first": "NB,2,BS,H,D",
    "flashinfer_hnd": "NB,2,BS,H,D", "packed": "NB,H,BS,2D", "vllm_cpu": "NB,H,2,BS,D",
    "sglang_mha": "S,H,D",
}


@dataclass(frozen=True)
class Layout:
    name: str
    model: str
    engine: str
    block_size: int
    misalign_bytes: int = 0  # the cache starts this many bytes into a 16-byte aligned buffer

    @property
    def aligned(self) -> bool:
        return self.misalign_bytes == 0

    @property
    def kind(self) -> str:
        return SHAPES[self.model]["kind"]

    @property
    def dims(self) -> str:
        return ENGINES[self.engine]


LAYOUTS = [
    Layout("mla-bf16-576", "deepseek-v3-mla", "mla", 64),
    Layout("mla-fp8-576", "deepseek-v3-fp8", "mla", 64),
    Layout("mla-fp8ds-656", "deepseek-v3-fp8ds", "mla", 64),
    Layout("mla-vllm-cpu", "deepseek-v3-mla", "mla_cpu", 16),
    Layout("mla-sglang", "deepseek-v3-mla", "sglang_mla", 1),
    Layout("llama8b-kv-first-nhd", "llama3.1-8b", "kv_first", 16),
    Layout("llama8b-kv-first-hnd", "llama3.1-8b", "kv_first_hnd", 16),
    Layout("llama8b-blocks-first-nhd", "llama3.1-8b", "blocks_first", 16),
    Layout("llama8b-flashinfer-hnd", "llama3.1-8b", "flashinfer_hnd", 16),
    Layout("llama8b-flashinfer-hnd-bs128", "llama3.1-8b", "flashinfer_hnd", 128),
    Layout("llama8b-kv-first-nhd-bs48", "llama3.1-8b", "kv_first", 48),  # not a power of two
    Layout("llama8b-packed", "llama3.1-8b", "packed", 16),
    Layout("llama8b-vllm-cpu", "llama3.1-8b", "vllm_cpu", 16),
    Layout("llama8b-sglang", "llama3.1-8b", "sglang_mha", 1),
    Layout("llama70b-tp8-kv-first-nhd", "llama-70b-tp8", "kv_first", 16),
    Layout("llama70b-tp8-flashinfer-hnd", "llama-70b-tp8", "flashinfer_hnd", 16),
    Layout("llama70b-tp4-kv-first-hnd", "llama-70b-tp4", "kv_first_hnd", 16),
    Layout("llama8b-unaligned-8", "llama3.1-8b", "kv_first", 16, misalign_bytes=8),
    Layout("llama8b-unaligned-2", "llama3.1-8b", "kv_first", 16, misalign_bytes=2),
]
BY_NAME = {layout.name: layout for layout in LAYOUTS}


def build(layout: Layout, num_blocks: int, device: str | torch.device = "cpu", *,
          num_layers: int | None = None, random: bool = True):
    """``(layers, dims, kind)`` for ``PagedKV.from_tensors``: ``num_layers`` (default: the
    model's) tensors of ``num_blocks`` blocks in ``layout``'s engine layout, random bytes (or
    zeros)."""
    shape = SHAPES[layout.model]
    nb, bs, h, d = num_blocks, layout.block_size, shape["num_heads"], shape["head_dim"]
    dtype = shape["dtype"]
    count = shape["num_layers"] if num_layers is None else num_layers

    def alloc(*size: int) -> torch.Tensor:
        numel = 1
        for s in size:
            numel *= s
        item = torch.empty((), dtype=dtype).element_size()
        skip = layout.misalign_bytes // item
        raw = torch.empty(numel + 16, dtype=dtype, device=device)
        if random:
            raw.view(torch.uint8).random_(0, 256)
        else:
            raw.view(torch.uint8).zero_()
        return raw[skip:skip + numel].view(size)

    def one():
        e = layout.engine
        if e == "mla":
            return alloc(nb, bs, d)
        if e == "mla_cpu":
            return alloc(nb, 1, bs, d).squeeze(1)
        if e == "sglang_mla":
            return alloc(nb * bs, 1, d)
        if e == "kv_first":
            return alloc(2, nb, bs, h, d)
        if e == "kv_first_hnd":
            return alloc(2, nb, h, bs, d).permute(0, 1, 3, 2, 4)
        if e == "blocks_first":
            return alloc(nb, 2, bs, h, d)
        if e == "flashinfer_hnd":
            return alloc(nb, 2, h, bs, d).permute(0, 1, 3, 2, 4)
        if e == "packed":
            return alloc(nb, h, bs, 2 * d)
        if e == "vllm_cpu":
            return alloc(nb, h, bs, 2 * d).view(nb, h, 2, bs, d)
        if e == "sglang_mha":
            return alloc(nb * bs, h, d)
        raise ValueError(f"unknown engine layout {e!r}")

    if layout.engine == "sglang_mha":
        return ([one() for _ in range(count)], [one() for _ in range(count)]), layout.dims, layout.kind
    return [one() for _ in range(count)], layout.dims, layout.kind
