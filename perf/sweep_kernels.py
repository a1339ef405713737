"""pack / unpack throughput over a model table, against two baselines measured in the same run.

For each model shape and 1..64 chunks of 256 tokens (slots: whole blocks in random order, as a
vLLM block table gives them):
  gpukv        pack / unpack through gpukv.paged.copy (auto backend: Triton on CUDA, torch on CPU)
  copy         a plain copy of the same number of bytes (``dst.copy_(src)``, memcpy)
  torch loop   per layer and K/V: index_select the rows of all chunks, then copy them into the
               chunk views (unpack: index_copy_ back) -- the straightforward per-layer torch path
The three are timed in turn within each repeat, so a busy machine slows them alike, and the
ratios are of medians. Reports GB/s and ratio_vs_copy / ratio_vs_loop. Goals: CPU torch path
>= 0.8x copy for rows of 512 B and more; GPU Triton >= 0.8x copy and >= 2x the loop.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import MODELS, device_name, progress, results_dir, write_csv  # noqa: E402

from gpukv.paged.copy import pack, resolve_backend, unpack  # noqa: E402
from gpukv.paged.layout import PagedKV  # noqa: E402
from gpukv.paged.planes import plane_views  # noqa: E402

CHUNK = 256
PRESETS = {
    "quick": dict(models=["llama3.1-8b", "llama-70b-tp8", "deepseek-v3-mla", "deepseek-v3-fp8ds"],
                  chunks=[1, 4, 16], layouts=["nhd"], repeats=7),
    "full": dict(models=list(MODELS), chunks=[1, 2, 4, 8, 16, 32, 64], layouts=["nhd", "hnd"],
                 repeats=15),
}


def build(model: str, layout: str, num_chunks: int, device: str):
    """A cache with room for the chunks plus spare blocks, slots of whole blocks in random order.

    ``layout`` "nhd": vLLM kv-first ``2,NB,BS,H,D`` (MHA) / ``NB,BS,D`` (MLA); "hnd": FlashInfer
    ``NB,2,BS,H,D`` stored HND (MHA only).
    """
    spec = MODELS[model]
    block = 64 if spec["kind"] == "mla" else 16
    num_tokens = num_chunks * CHUNK
    num_blocks = num_tokens // block + 8
    h, d = spec["num_heads"], spec["head_dim"]
    if spec["kind"] == "mla":
        physical, perm, dims = (num_blocks, block, d), None, "NB,BS,D"
    elif layout == "nhd":
        physical, perm, dims = (2, num_blocks, block, h, d), None, "2,NB,BS,H,D"
    else:
        physical, perm, dims = (num_blocks, 2, h, block, d), (0, 1, 3, 2, 4), "NB,2,BS,H,D"
    layers = []
    for _ in range(spec["num_layers"]):
        t = torch.empty(physical, dtype=spec["dtype"], device=device)
        t.view(torch.uint8).random_(0, 256)
        layers.append(t.permute(*perm) if perm else t)
    paged = PagedKV.from_tensors(layers, dims, kind=spec["kind"])
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randperm(num_blocks, generator=gen)[: num_tokens // block]
    slots = ((blocks[:, None] * block + torch.arange(block)).flatten()).to(device)
    cb = paged.chunk_bytes(CHUNK)
    arena = torch.empty(num_chunks * cb, dtype=torch.uint8, device=device)
    offsets = torch.arange(num_chunks, dtype=torch.int64) * cb
    return paged, slots, arena, offsets


def torch_loop(paged: PagedKV, slots: torch.Tensor, arena: torch.Tensor, num_chunks: int, op: str) -> None:
    """The per-layer baseline: one gather (scatter) per layer and K/V, through a temporary."""
    view = arena.view(num_chunks, paged.num_layers, paged.num_kv, CHUNK, paged.row_bytes)
    block, pos = slots // paged.block_size, slots % paged.block_size
    for plane, v in enumerate(plane_views(paged)):  # [NB, BS, H, head_bytes] bytes
        layer, kv = divmod(plane, paged.num_kv)
        if v.is_contiguous():
            rows = v.reshape(paged.num_slots, -1)
            if op == "pack":
                view[:, layer, kv] = rows.index_select(0, slots).view(num_chunks, CHUNK, -1)
            else:
                rows.index_copy_(0, slots, view[:, layer, kv].reshape(num_chunks * CHUNK, -1))
        elif op == "pack":  # strided (HND) pages: through the 4-D view
            view[:, layer, kv] = v[block, pos].reshape(num_chunks, CHUNK, -1)
        else:
            v[block, pos] = view[:, layer, kv].reshape(num_chunks * CHUNK, paged.num_heads, -1)


def bench_together(fns: dict[str, Callable[[], object]], device: str, repeats: int,
                   warmup: int = 2) -> dict[str, float]:
    """Median seconds of each function, timed in turn within every repeat (CUDA events on a GPU)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    cuda = torch.device(device).type == "cuda"
    for _ in range(repeats):
        for name, fn in fns.items():
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def run_point(model: str, layout: str, num_chunks: int, device: str, repeats: int,
              backend: str | None) -> list[dict]:
    paged, slots, arena, offsets = build(model, layout, num_chunks, device)
    nbytes = arena.numel()
    src = torch.empty_like(arena).random_(0, 256)
    chosen = resolve_backend(backend, torch.device(device))
    rows = []
    for op, fn in (("pack", pack), ("unpack", unpack)):
        t = bench_together({
            "copy": lambda: arena.copy_(src),
            "gpukv": lambda: fn(paged, slots, arena, offsets, chunk_size=CHUNK, backend=backend),
            "loop": lambda: torch_loop(paged, slots, arena, num_chunks, op),
        }, device, repeats)
        rows.append(dict(model=model, layout=paged.dims if layout == "nhd" else f"{paged.dims} HND",
                         op=op, num_chunks=num_chunks, row_bytes=paged.row_bytes,
                         layers=paged.num_layers, bytes=nbytes, seconds=t["gpukv"],
                         gbps=nbytes / t["gpukv"] / 1e9, copy_gbps=nbytes / t["copy"] / 1e9,
                         loop_gbps=nbytes / t["loop"] / 1e9, ratio_vs_copy=t["copy"] / t["gpukv"],
                         ratio_vs_loop=t["loop"] / t["gpukv"], backend=chosen,
                         device=device_name(device), threads=torch.get_num_threads()))
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    for ax, op in zip(axes, ("pack", "unpack")):
        for key in dict.fromkeys((r["model"], r["layout"]) for r in rows):
            sub = [r for r in rows if (r["model"], r["layout"]) == key and r["op"] == op]
            ax.plot([r["num_chunks"] for r in sub], [r["ratio_vs_copy"] for r in sub], "o-",
                    label=f"{key[0]} [{key[1]}] {sub[0]['row_bytes']} B rows")
        ax.axhline(0.8, color="gray", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{op} ({rows[0]['device']}, {rows[0]['backend']})")
        ax.set_xlabel("chunks of 256 tokens per call")
    axes[0].set_ylabel("gpukv GB/s / plain copy GB/s (same run)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", choices=["triton", "torch", "ref"], default=None,
                        help="force a backend (default: auto for the device)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for all three (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    points = [(m, lay, n) for m in preset["models"] for lay in preset["layouts"]
              for n in preset["chunks"] if lay == "nhd" or MODELS[m]["kind"] == "mha"]
    rows = []
    for model, layout, n in progress(points, desc="kernel sweep"):
        rows += run_point(model, layout, n, args.device, preset["repeats"], args.backend)
    out = results_dir(args.device)
    csv_path = write_csv(out / f"sweep_kernels_{args.preset}.csv", rows)
    plot(rows, out / f"sweep_kernels_{args.preset}.png")
    print(f"{'model':18} {'layout':16} {'op':6} {'chunks':>6} {'row B':>5} {'MB':>6} {'GB/s':>6} "
          f"{'copy':>6} {'loop':>6} {'x copy':>6} {'x loop':>6}")
    for r in rows:
        print(f"{r['model']:18} {r['layout']:16} {r['op']:6} {r['num_chunks']:6d} {r['row_bytes']:5d} "
              f"{r['bytes'] / 1e6:6.1f} {r['gbps']:6.2f} {r['copy_gbps']:6.2f} {r['loop_gbps']:6.2f} "
              f"{r['ratio_vs_copy']:6.2f} {r['ratio_vs_loop']:6.2f}")
    print(f"backend {rows[0]['backend']} on {rows[0]['device']}, {rows[0]['threads']} torch threads; "
          f"wrote {csv_path} and {csv_path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
