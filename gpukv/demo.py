"""``gpukv demo``: the whole lifecycle on random KV in vLLM-shaped paged caches.

For each kind (a DeepSeek-like MLA model and a Llama-like MHA model, both TP=2 by default):
store from rank 0 (MLA) or every rank (MHA), look up with ``tp_size``, retrieve into fresh slots
by every rank, check the pages bit-exact; then restart the engine on the same disk folder and do
it again from disk. Exit code 1 if any check fails.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass

import torch

from gpukv.config import EngineConfig

log = logging.getLogger("gpukv.demo")

# name, dims, per-layer shape without the block dims, dtype, block size
_KINDS = {
    "mla": dict(model="deepseek-like", dims="NB,BS,D", block_size=64, dtype=torch.bfloat16),
    "mha": dict(model="llama-like", dims="NB,2,BS,H,D", block_size=16, dtype=torch.bfloat16),
}


@dataclass(slots=True)
class Row:
    kind: str
    phase: str
    tokens: int
    chunks: int
    hit_l1: int
    hit_disk: int
    store_gbps: float
    retrieve_gbps: float
    verified: bool


def _layer_shape(kind: str, num_blocks: int, block_size: int, tp_size: int) -> tuple[int, ...]:
    if kind == "mla":
        return (num_blocks, block_size, 576)
    return (num_blocks, 2, block_size, max(1, 8 // tp_size), 128)


def token_rows(layer: torch.Tensor, kind: str, slots: torch.Tensor) -> torch.Tensor:
    """The KV rows of ``slots`` in one layer tensor: ``[tokens, row]`` (MLA) or ``[2, tokens, H, D]``."""
    if kind == "mla":
        return layer.reshape(-1, layer.shape[-1])[slots]
    nb, _, bs, h, d = layer.shape
    return layer.permute(1, 0, 2, 3, 4).reshape(2, nb * bs, h, d)[:, slots]


def make_pages(kind: str, num_layers: int, num_blocks: int, tp_size: int, device: str,
               alloc=None) -> list[torch.Tensor]:
    spec = _KINDS[kind]
    shape = _layer_shape(kind, num_blocks, spec["block_size"], tp_size)
    alloc = alloc or (lambda s, dt: torch.empty(s, dtype=dt, device=device))
    pages = []
    for _ in range(num_layers):
        t = alloc(shape, spec["dtype"])
        t.view(torch.int16).random_(-(1 << 15), 1 << 15)  # arbitrary bit patterns, NaNs included
        pages.append(t)
    return pages


def _slots(num_tokens: int, block_size: int, blocks: torch.Tensor) -> torch.Tensor:
    offs = torch.arange(num_tokens)
    return blocks[offs // block_size] * block_size + offs % block_size


def run_kind(cache, kind: str, *, tp_size: int, num_tokens: int, num_layers: int, device: str,
             make_cache, alloc=None, gen: torch.Generator) -> list[Row]:
    """Store, lookup, retrieve by every rank and verify; then the same after a restart from disk."""
    spec = _KINDS[kind]
    bs, model = spec["block_size"], spec["model"]
    blocks_needed = -(-num_tokens // bs)
    num_blocks = 3 * blocks_needed
    perm = torch.randperm(num_blocks, generator=gen)
    store_slots = _slots(num_tokens, bs, perm[:blocks_needed])
    phase_slots = [_slots(num_tokens, bs, perm[(i + 1) * blocks_needed:(i + 2) * blocks_needed])
                   for i in range(2)]
    pages = [make_pages(kind, num_layers, num_blocks, tp_size, device, alloc) for _ in range(tp_size)]
    tokens = torch.randint(0, 50_000, (num_tokens,), generator=gen).tolist()
    storers = [0] if kind == "mla" else list(range(tp_size))
    # what every rank must see after retrieve: the storing rank's rows (MLA), its own rows (MHA)
    src = {r: [token_rows(layer, kind, store_slots).clone() for layer in pages[0 if kind == "mla" else r]]
           for r in range(tp_size)}
    rows = []
    for phase in ("fresh", "after restart"):
        if phase == "after restart":
            cache = make_cache(restart=True)
        for r in range(tp_size):
            cache.register(f"{kind}-rank{r}", model, pages[r], spec["dims"], kind=kind, tp_rank=r,
                           tp_size=tp_size)
        store_s = 0.0
        stored = 0
        if phase == "fresh":
            t0 = time.perf_counter()
            stored = sum(cache.store(f"{kind}-rank{r}", tokens, store_slots) for r in storers)
            store_s = time.perf_counter() - t0
            if kind == "mla" and tp_size > 1:  # a second rank's store of the same chunks is a no-op
                assert cache.store(f"{kind}-rank1", tokens, store_slots) == 0
        stats0 = cache.stats()
        req = f"req-{kind}-{phase.replace(' ', '-')}"
        hit = cache.lookup(model, tokens, request_id=req, tp_size=tp_size)
        stats1 = cache.stats()
        hit_l1 = stats1["hit_chunks_l1"] - stats0["hit_chunks_l1"]
        hit_disk = (stats1["hit_chunks_tier"].get("disk", 0) - stats0["hit_chunks_tier"].get("disk", 0))
        slots = phase_slots[0 if phase == "fresh" else 1]
        t0 = time.perf_counter()
        got = [cache.retrieve(f"{kind}-rank{r}", tokens[:hit], slots[:hit], request_id=req)
               for r in range(tp_size)]
        retrieve_s = time.perf_counter() - t0
        ok = hit == (num_tokens // cache_chunk(cache)) * cache_chunk(cache) and all(g == hit for g in got)
        for r in range(tp_size):
            for layer, ref in zip(pages[r], src[r]):
                ok &= torch.equal(token_rows(layer, kind, slots[:hit]).view(torch.int16),
                                  _cut(ref, kind, hit).view(torch.int16))
        left = cache.free_lookup_locks(req)
        ok &= left == 0
        cache.end_session(req)
        layer_bytes = _bytes_per_token(pages[0][0], kind) * num_layers
        rows.append(Row(kind, phase, hit, hit // cache_chunk(cache), hit_l1, hit_disk,
                        stored * layer_bytes / max(store_s, 1e-9) / 1e9 if stored else 0.0,
                        sum(got) * layer_bytes / max(retrieve_s, 1e-9) / 1e9, bool(ok)))
        for r in range(tp_size):
            cache.unregister(f"{kind}-rank{r}")
        if phase == "fresh":
            cache.flush()
    return rows


def _cut(ref: torch.Tensor, kind: str, hit: int) -> torch.Tensor:
    return ref[:hit] if kind == "mla" else ref[:, :hit]


def _bytes_per_token(layer: torch.Tensor, kind: str) -> int:
    per_row = layer.shape[-1] * layer.element_size()
    return per_row if kind == "mla" else 2 * layer.shape[-2] * per_row


def cache_chunk(cache) -> int:
    return cache.config.chunk_size if hasattr(cache, "config") else cache.chunk_size


def run_demo(*, kinds: list[str], tp_size: int = 2, num_tokens: int = 2048, num_layers: int = 8,
             chunk_size: int = 256, device: str | None = None, server: bool = False) -> int:
    """Run the demo; returns the process exit code (0 when every check passed)."""
    from gpukv.engine import CacheEngine

    if tp_size < 1 or num_tokens < chunk_size or num_layers < 1:
        raise ValueError(f"need tp >= 1, tokens >= chunk_size, layers >= 1; got tp={tp_size}, "
                         f"tokens={num_tokens}, layers={num_layers}")
    gen = torch.Generator().manual_seed(0)
    rows: list[Row] = []
    if server:
        rows = _run_through_server(kinds, tp_size=tp_size, num_tokens=num_tokens,
                                   num_layers=num_layers, chunk_size=chunk_size, device=device,
                                   gen=gen)
        _print_table(rows)
        return 0 if all(r.verified for r in rows) else 1
    with tempfile.TemporaryDirectory(prefix="gpukv-demo-") as disk_dir:
        for kind in kinds:
            config = EngineConfig(capacity_bytes=1 << 30, device=device, chunk_size=chunk_size,
                                  disk_dir=f"{disk_dir}/{kind}")
            holder = {}

            def make_cache(restart: bool = False):
                if restart:
                    holder["cache"].close()
                    log.info("restarting the engine on %s", config.disk_dir)
                holder["cache"] = CacheEngine(config)
                return holder["cache"]

            cache = make_cache()
            rows += run_kind(cache, kind, tp_size=tp_size, num_tokens=num_tokens,
                             num_layers=num_layers, device=config.device, make_cache=make_cache, gen=gen)
            holder["cache"].close()
    _print_table(rows)
    return 0 if all(r.verified for r in rows) else 1


def _run_through_server(kinds: list[str], *, tp_size: int, num_tokens: int, num_layers: int,
                        chunk_size: int, device: str | None, gen: torch.Generator) -> list[Row]:
    """The demo through a spawned ``gpukv serve``: the server keeps the books and owns the arena
    (shared memory on CPU, CUDA IPC on GPU); this process's ranks copy their own plain tensors in
    and out of it. The "after restart" phase restarts the server on the same disk folder."""
    from gpukv.config import default_device
    from gpukv.frontend.client import CacheClient
    from gpukv.frontend.process import ServerProcess

    device = device or default_device()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="gpukv-demo-") as tmp:
        for kind in kinds:
            address, disk_dir = f"ipc://{tmp}/gpukv-{kind}.sock", f"{tmp}/{kind}"
            holder: dict = {}

            def make_cache(restart: bool = False):
                if restart:
                    holder.pop("cache").close()
                    holder.pop("server").stop()
                    log.info("restarting the server on %s", disk_dir)
                holder["server"] = ServerProcess(address, capacity_bytes=1 << 30, device=device,
                                                 chunk_size=chunk_size, disk_dir=disk_dir)
                holder["cache"] = CacheClient(address, timeout_s=120)
                return holder["cache"]

            try:
                rows += run_kind(make_cache(), kind, tp_size=tp_size, num_tokens=num_tokens,
                                 num_layers=num_layers, device=device, make_cache=make_cache,
                                 gen=gen)
            finally:
                if "cache" in holder:
                    holder["cache"].close()
                if "server" in holder:
                    holder["server"].stop()
    return rows


def _print_table(rows: list[Row]) -> None:
    head = f"{'kind':5} {'phase':14} {'tokens':>7} {'chunks':>6} {'L1':>4} {'disk':>4} {'store GB/s':>10} {'retr GB/s':>9}  verified"
    print(head)
    print("-" * len(head))
    for r in rows:
        store = f"{r.store_gbps:10.2f}" if r.store_gbps else f"{'-':>10}"
        print(f"{r.kind:5} {r.phase:14} {r.tokens:7d} {r.chunks:6d} {r.hit_l1:4d} {r.hit_disk:4d} "
              f"{store} {r.retrieve_gbps:9.2f}  {'yes' if r.verified else 'NO'}")
