"""vLLM's per-layer KV tensors as gpukv layouts: which attention backends gpukv maps, and the views
of vLLM's own tensors it registers (no copy, nothing here imports vLLM).

vLLM 0.32 hands every attention layer as a logical ``[NB, H, BS, C]`` view of one buffer, the
physical order in its strides (``vllm/v1/kv_cache_interface.py: create_kv_cache_views``, the
order a ``KVCacheLayout`` names); gpukv's descriptor reads the strides, so any physical order
works. Per backend:

- ``CPU_ATTN`` (vLLM-CPU, MHA): ``[NB, H, BS, 2*D]``, contiguous, all layers views of one buffer.
  The attention ops view it as ``[NB, H, 2*BS, D]`` and split K and V there, and the ``vec`` ISA
  writes K **column-major** (``[D, BS]``, a token's K strided by BS) and V row-major
  (``[BS, D]``) (``vllm/v1/attention/backends/cpu_attn.py``). Registered as the
  ``[NB, H, 2, BS, D]`` view (dims ``"NB,H,2,BS,D"``): the V rows are token rows, the K "rows"
  are not, so only copies of whole blocks are byte-exact -- which the planner guarantees (a
  chunk is a whole number of blocks, ``-1`` slots cover whole blocks). The ISA is in the model
  key.
- ``CPU_MLA`` and ``AMX_MLA`` (vLLM-CPU, DeepSeek MLA): ``[NB, 1, BS, 576]``; registered as the
  ``[NB, BS, 576]`` view (dims ``"NB,BS,D"``), one latent row per token. ``AMX_MLA`` (picked on
  CPUs with AMX, bf16 only, block size a multiple of 32) writes the same rows: its
  ``amx_mla_concat_and_cache`` puts ``[kv_c | k_pe]`` at row ``slot`` and its kernels read the
  cache as ``view(-1, 1, 576)`` (``vllm/v1/attention/backends/mla/amx_mla.py``).
- ``FLASH_ATTN``, ``TRITON_ATTN`` and ``FLASHINFER`` (GPU, MHA): C is K | V (the first D of each
  head's content are K, the last D are V: ``kv_cache.transpose(1, 2).split(head_size, -1)``, and
  FlashInfer's ``kv_cache.permute(layer_view_order).split(head_size, -1)``), so the token rows are
  real rows: dims ``"NB,H,BS,2D"`` on the tensor as given. FlashInfer's NVFP4 caches (K heads,
  then V heads, with block scales) are refused by :mod:`.topology`. UNTESTED on a GPU: the
  layouts are mapped from vLLM's source and checked on CPU tensors built the way vLLM builds them.
- MLA GPU backends: one latent row per token (H = 1), dims ``"NB,BS,D"``.
"""

from __future__ import annotations

from typing import Mapping

import torch

BACKEND_LAYOUTS = {"CPU_ATTN": ("mha", "NB,H,2,BS,D"), "CPU_MLA": ("mla", "NB,BS,D"),
                   "AMX_MLA": ("mla", "NB,BS,D"),
                   **{name: ("mha", "NB,H,BS,2D") for name in ("FLASH_ATTN", "TRITON_ATTN", "FLASHINFER")},
                   **{name: ("mla", "NB,BS,D") for name in
                      ("FLASHMLA", "FLASH_ATTN_MLA", "TRITON_MLA", "CUTLASS_MLA", "FLASHINFER_MLA")}}


def kv_views(kv_caches: Mapping[str, torch.Tensor], backend: str) -> tuple[dict[str, torch.Tensor], str, str]:
    """``(views, dims, kind)`` to register for vLLM's per-layer KV tensors of ``backend``.

    ``kv_caches``: layer name -> tensor, as ``register_kv_caches`` receives them (layer order is
    the dict order, the model's). The views share memory with vLLM's tensors (no copy).
    ValueError / TypeError naming what does not fit.
    """
    if backend not in BACKEND_LAYOUTS:
        raise ValueError(f"attention backend {backend!r} has no gpukv layout yet; known: {sorted(BACKEND_LAYOUTS)}")
    kind, dims = BACKEND_LAYOUTS[backend]
    if not kv_caches:
        raise ValueError("kv_caches is empty")
    views = {}
    for name, t in kv_caches.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"kv_caches[{name!r}] is {type(t).__name__}, not a tensor")
        if kind == "mla":
            if t.dim() == 4 and t.shape[1] == 1:
                t = t.squeeze(1)
            if t.dim() != 3:
                raise ValueError(f"kv_caches[{name!r}] has shape {tuple(t.shape)}; {backend} expects "
                                 "[NB, 1, BS, row] or [NB, BS, row]")
            views[name] = t
        else:
            if t.dim() != 4 or t.shape[-1] % 2:
                raise ValueError(f"kv_caches[{name!r}] has shape {tuple(t.shape)}; {backend} expects "
                                 "[NB, H, BS, 2*D]")
            if dims == "NB,H,BS,2D":
                views[name] = t  # any physical order: the strides say it
                continue
            if not t.is_contiguous():
                raise ValueError(f"kv_caches[{name!r}] is not contiguous (strides {t.stride()}); the "
                                 f"{backend} in-block layout assumes it is")
            nb, h, bs, d2 = t.shape
            views[name] = t.view(nb, h, 2, bs, d2 // 2)
    return views, dims, kind
