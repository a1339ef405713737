"""Builders of small paged KV caches in every supported layout, filled with random bit patterns.

``make_cache`` returns what a worker would pass to ``PagedKV.from_tensors``: per-layer tensors
(separate allocations, or views of ONE buffer as vLLM allocates them), the dims string and kind.
"""

from __future__ import annotations

import os

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
          "fp8": torch.float8_e4m3fn, "u8": torch.uint8}

LAYOUTS = ["kv_first", "kv_first_hnd", "blocks_first", "flashinfer_hnd", "packed", "cpu_split",
           "mla", "mla_cpu", "sglang_mha", "sglang_mla"]
# all layers as views of one buffer, as vLLM allocates them (and a dict name -> tensor)
CROSS_LAYER = ["cross_kv_first", "cross_blocks_outer", "cross_cpu_split", "cross_mla_dict"]

# where the Triton backend runs: compiled on a GPU with GPUKV_TRITON_COMPILED=1, else interpreted
TRITON_DEVICE = "cuda" if os.environ.get("GPUKV_TRITON_COMPILED") == "1" else "cpu"


def backend_devices() -> list[tuple[str, str]]:
    """(backend, device) pairs the copy tests run: every backend on CPU (Triton interpreted), and
    on a GPU when present."""
    pairs = [("torch", "cpu"), ("ref", "cpu"), ("triton", TRITON_DEVICE)]
    if torch.cuda.is_available():
        pairs += [("torch", "cuda"), ("ref", "cuda")]
    return pairs


def random_bits(shape, dtype, gen: torch.Generator, device="cpu") -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype)
    t.view(torch.uint8).copy_(torch.randint(0, 256, t.view(torch.uint8).shape, dtype=torch.uint8, generator=gen))
    return t.to(device)


def make_cache(layout: str, *, dtype=torch.bfloat16, num_layers=3, num_blocks=6, block_size=16,
               heads=2, head_dim=8, seed=0, device="cpu"):
    """Returns (layers argument, dims, kind) for PagedKV.from_tensors; MLA rows are
    ``heads * head_dim`` wide."""
    gen = torch.Generator().manual_seed(seed)
    nb, bs, h, d, L = num_blocks, block_size, heads, head_dim, num_layers

    def bits(*shape):
        return random_bits(shape, dtype, gen, device)

    if layout == "kv_first":
        return [bits(2, nb, bs, h, d) for _ in range(L)], "2,NB,BS,H,D", "mha"
    if layout == "kv_first_hnd":  # physical [2, NB, H, BS, D], logical 2,NB,BS,H,D
        return [bits(2, nb, h, bs, d).permute(0, 1, 3, 2, 4) for _ in range(L)], "2,NB,BS,H,D", "mha"
    if layout == "blocks_first":
        return [bits(nb, 2, bs, h, d) for _ in range(L)], "NB,2,BS,H,D", "mha"
    if layout == "flashinfer_hnd":  # physical [NB, 2, H, BS, D]
        return [bits(nb, 2, h, bs, d).permute(0, 1, 3, 2, 4) for _ in range(L)], "NB,2,BS,H,D", "mha"
    if layout == "packed":
        return [bits(nb, h, bs, 2 * d) for _ in range(L)], "NB,H,BS,2D", "mha"
    if layout == "cpu_split":  # vLLM CPU: [NB, H, BS, 2D] whose head blocks are K rows then V rows
        return [bits(nb, h, bs, 2 * d).view(nb, h, 2, bs, d) for _ in range(L)], "NB,H,2,BS,D", "mha"
    if layout == "mla":
        return [bits(nb, bs, h * d) for _ in range(L)], "NB,BS,D", "mla"
    if layout == "mla_cpu":  # vLLM CPU MLA: [NB, 1, BS, 576] squeezed to [NB, BS, 576]
        return [bits(nb, 1, bs, h * d).squeeze(1) for _ in range(L)], "NB,BS,D", "mla"
    if layout == "sglang_mha":
        k = [bits(nb * bs, h, d) for _ in range(L)]
        v = [bits(nb * bs, h, d) for _ in range(L)]
        return (k, v), "S,H,D", "mha"
    if layout == "sglang_mla":
        return [bits(nb * bs, 1, h * d) for _ in range(L)], "S,H,D", "mla"
    if layout == "cross_kv_first":  # one [L, 2, NB, BS, H, D] buffer, layer l = buf[l]
        buf = bits(L, 2, nb, bs, h, d)
        return [buf[i] for i in range(L)], "2,NB,BS,H,D", "mha"
    if layout == "cross_blocks_outer":  # one [NB, L, 2, BS, H, D] buffer: layers interleave per block
        buf = bits(nb, L, 2, bs, h, d)
        return [buf[:, i] for i in range(L)], "NB,2,BS,H,D", "mha"
    if layout == "cross_cpu_split":  # vLLM CPU: one [L, NB, H, BS, 2D] buffer, viewed per layer
        buf = bits(L, nb, h, bs, 2 * d)
        return [buf[i].view(nb, h, 2, bs, d) for i in range(L)], "NB,H,2,BS,D", "mha"
    if layout == "cross_mla_dict":  # one [L, NB, BS, D] buffer as vLLM's dict name -> tensor
        buf = bits(L, nb, bs, h * d)
        return {f"model.layers.{i}.self_attn.attn": buf[i] for i in range(L)}, "NB,BS,D", "mla"
    raise ValueError(layout)


def layer_tensors(layers) -> list[torch.Tensor]:
    """Every tensor in a layers argument (a list, a dict, a (k, v) pair, a stacked tensor)."""
    if isinstance(layers, torch.Tensor):
        return [layers]
    if isinstance(layers, dict):
        return list(layers.values())
    if isinstance(layers, tuple) and len(layers) == 2 and not isinstance(layers[0], torch.Tensor):
        return layer_tensors(layers[0]) + layer_tensors(layers[1])
    return list(layers)


def storages(layers) -> list[torch.Tensor]:
    """Writable flat uint8 views of every distinct storage behind a layers argument."""
    seen, out = set(), []
    for t in layer_tensors(layers):
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            out.append(torch.empty(0, dtype=torch.uint8, device=t.device).set_(s))
    return out


def flat_bytes(layers) -> list[torch.Tensor]:
    """A copy of every storage's bytes (for snapshots and bit-exact comparisons)."""
    return [s.clone() for s in storages(layers)]


def clone_layers(layers):
    """The same layers argument over a copy of the memory: views of one buffer stay views of one
    (copied) buffer, strides and padding included."""
    copies = {s.data_ptr(): s.clone() for s in storages(layers)}

    def clone(t: torch.Tensor) -> torch.Tensor:
        raw = copies[t.untyped_storage().data_ptr()]
        typed = torch.empty(0, dtype=t.dtype, device=t.device).set_(raw.untyped_storage())
        return torch.as_strided(typed, t.shape, t.stride(), t.storage_offset())

    if isinstance(layers, torch.Tensor):
        return clone(layers)
    if isinstance(layers, dict):
        return {k: clone(t) for k, t in layers.items()}
    if isinstance(layers, tuple) and len(layers) == 2 and not isinstance(layers[0], torch.Tensor):
        return (clone_layers(layers[0]), clone_layers(layers[1]))
    return [clone(t) for t in layers]


def fill(layers, value: int) -> None:
    """Every byte of every storage behind ``layers`` set to ``value``."""
    for s in storages(layers):
        s.fill_(value)
