"""pack / unpack throughput over a model table, against baselines timed in the same repeats.

For each model shape, slot pattern, thread count and 1..N chunks of 256 tokens:
  gpukv   pack / unpack through gpukv.paged.copy (auto backend: Triton on CUDA, torch on CPU)
  copy    memcpy of the same number of bytes between two buffers from the same allocator, on
          the same threads by the same mechanism as the CPU path (numpy copies split over a
          Python thread pool; one thread: one copy); CUDA: ``dst.copy_(src)``
  loop    per layer and K/V: index_select the rows of all chunks, then copy them into the chunk
          views (unpack: index_copy_ back) -- the straightforward per-layer torch path
  numpy   (CPU, where gpukv's compiled gather is built) the same call with it off: numpy's take /
          put, what the CPU path runs without a C compiler; ``ratio_vs_numpy_path`` = its time /
          gpukv's time of the same repeat
Slot patterns: ``blocks`` = whole blocks in random order (a vLLM block table: a random
permutation of a pool twice the size needed, each chunk = 256 / block_size whole blocks);
``tokens`` = random token slots from the same pool.

Method: the three are timed in turn within every repeat (A B C A B C ...), so a busy machine slows
them alike; thread settings are fixed before torch is imported and printed; min / median / max
of each are kept; ``ratio_vs_copy`` is the median over repeats of copy time / gpukv time of the
same repeat (min and max of that ratio beside it); the load average is printed with the results
and kept per point. Goals
(1 thread, CPU): ratio_vs_copy >= 0.9 for ``blocks``, >= 0.6 for ``tokens``. CSV and PNG go to
perf/results/<device>/sweep_kernels_<preset>.csv / .png.
"""

from __future__ import annotations

import os

# fixed before torch / numpy start their thread pools: idle OpenMP threads sleep instead of
# spinning on the cores the next measurement needs, and numpy's BLAS threads stay out of the way
THREAD_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_NUM_THREADS": "1"}
for _k, _v in THREAD_ENV.items():
    os.environ.setdefault(_k, _v)

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import (MODELS, ParallelCopy, device_name, fill_random, load_average, progress,  # noqa: E402
                    results_dir, spread, time_interleaved, write_csv)
from pools import Rotation, describe, num_sets  # noqa: E402

from gpukv.paged.copy import pack, resolve_backend, unpack  # noqa: E402
from gpukv.paged.layout import PagedKV  # noqa: E402
from gpukv.paged.native import disabled as native_disabled, native_copy  # noqa: E402
from gpukv.paged.planes import plane_views  # noqa: E402

CHUNK = 256
POOL = 2  # a cache-resident point's cache holds POOL x the blocks a call touches
GOALS = {"blocks": 0.9, "tokens": 0.6}
PRESETS = {
    "quick": dict(models=["llama3.1-8b", "llama-70b-tp8", "deepseek-v3-mla", "deepseek-v3-fp8ds"],
                  chunks=[1, 4], layouts=["nhd"], slots=["blocks", "tokens"], threads=[1, 2],
                  repeats=9, pools=["dram", "cache"]),
    "full": dict(models=list(MODELS), chunks=[1, 2, 4, 8, 16], layouts=["nhd", "hnd"],
                 slots=["blocks", "tokens"], threads=[1, 2], repeats=11, pools=["dram", "cache"]),
}


def build(model: str, layout: str, slots_kind: str, num_chunks: int, device: str, pool: str,
          seed: int = 0):
    """A cache, ``K`` disjoint slot sets, an arena of ``K`` windows and each window's chunk
    offsets (see :mod:`pools`: K = 1 for a cache-resident point, the pool is then POOL x the
    blocks one call needs; a DRAM-resident point's K x call bytes >= max(1 GiB, 8 x LLC)).

    ``layout`` "nhd": vLLM kv-first ``2,NB,BS,H,D`` (MHA) / ``NB,BS,D`` (MLA); "hnd": FlashInfer
    ``NB,2,BS,H,D`` stored HND (MHA only).
    """
    spec = MODELS[model]
    block = 64 if spec["kind"] == "mla" else 16
    num_tokens = num_chunks * CHUNK
    h, d = spec["num_heads"], spec["head_dim"]
    itemsize = torch.empty(0, dtype=spec["dtype"]).element_size()
    kv = 1 if spec["kind"] == "mla" else 2
    call_bytes = spec["num_layers"] * kv * num_tokens * h * d * itemsize
    k = num_sets(pool, call_bytes)
    num_blocks = (POOL if k == 1 else k) * num_tokens // block
    if spec["kind"] == "mla":
        physical, perm, dims = (num_blocks, block, d), None, "NB,BS,D"
    elif layout == "nhd":
        physical, perm, dims = (2, num_blocks, block, h, d), None, "2,NB,BS,H,D"
    else:
        physical, perm, dims = (num_blocks, 2, h, block, d), (0, 1, 3, 2, 4), "NB,2,BS,H,D"
    layers = []
    for _ in range(spec["num_layers"]):
        t = torch.empty(physical, dtype=spec["dtype"], device=device)
        fill_random(t)
        layers.append(t.permute(*perm) if perm else t)
    paged = PagedKV.from_tensors(layers, dims, kind=spec["kind"])
    gen = torch.Generator().manual_seed(seed)
    if slots_kind == "blocks":  # disjoint sets of whole blocks in random order
        blocks = torch.randperm(num_blocks, generator=gen)[: k * num_tokens // block]
        slots = (blocks[:, None] * block + torch.arange(block)).flatten()
    else:  # disjoint sets of random token slots
        slots = torch.randperm(num_blocks * block, generator=gen)[: k * num_tokens]
    slot_sets = [s.to(device) for s in slots.view(k, num_tokens)]
    cb = paged.chunk_bytes(CHUNK)
    window = num_chunks * cb
    arena = fill_random(torch.empty(k * window, dtype=torch.uint8, device=device), seed=1)
    offsets = [torch.arange(num_chunks, dtype=torch.int64) * cb + i * window for i in range(k)]
    return paged, slot_sets, arena, offsets, window


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


def run_point(model: str, layout: str, slots_kind: str, num_chunks: int, threads: int, device: str,
              repeats: int, backend: str | None, cache: tuple, turn: Rotation) -> list[dict]:
    """``cache``: what :func:`build` returned for this point, and ``turn`` its rotation over the
    slot sets (both shared by the point's thread counts: every call, whatever its subject, takes
    the next set, so none finds its memory warm)."""
    torch.set_num_threads(threads)
    paged, slot_sets, arena, offsets, window = cache
    k, nbytes = len(slot_sets), window
    if k == 1:
        src, dst = torch.empty_like(arena).random_(0, 256), torch.empty_like(arena)
    cpu_copy = ParallelCopy(threads)

    def memcpy() -> None:
        if k == 1:
            a, b = src, dst
        else:  # the same bytes between two windows of the arena no recent call touched
            i = turn()
            j = (i + k // 2) % k
            a, b = arena[i * window:(i + 1) * window], arena[j * window:(j + 1) * window]
        if b.device.type == "cuda":
            b.copy_(a)
        else:
            cpu_copy(b, a)

    def call(fn, **kwargs) -> None:
        i = turn()
        fn(paged, slot_sets[i], arena, offsets[i], chunk_size=CHUNK, backend=backend, **kwargs)

    def loop(op: str) -> None:
        i = turn()
        torch_loop(paged, slot_sets[i], arena[i * window:(i + 1) * window], num_chunks, op)

    chosen = resolve_backend(backend, torch.device(device))
    rows = []
    for op, fn in (("pack", pack), ("unpack", unpack)):
        subjects = {"copy": memcpy, "gpukv": lambda fn=fn: call(fn), "loop": lambda op=op: loop(op)}
        if chosen == "torch" and device == "cpu" and native_copy() is not None:
            def numpy_path(fn=fn) -> None:  # the same CPU path with the compiled loop off
                with native_disabled():
                    call(fn)
            subjects["numpy"] = numpy_path
        t = time_interleaved(subjects, device, repeats)
        vs_numpy = statistics.median(a / b for a, b in zip(t["numpy"], t["gpukv"])) if "numpy" in t else ""
        s, c, lp = spread(t["gpukv"]), spread(t["copy"]), spread(t["loop"])
        # each repeat times copy then gpukv back to back: their ratio pairs out slow phases
        ratios = [a / b for a, b in zip(t["copy"], t["gpukv"])]
        paired, (q1, _, q3) = spread(ratios), statistics.quantiles(ratios, n=4)
        rows.append(dict(
            model=model, layout=paged.dims if layout == "nhd" else f"{paged.dims} HND", slots=slots_kind,
            pool="cache-resident" if k == 1 else "DRAM-resident", pool_bytes=k * nbytes if k > 1 else 2 * nbytes,
            op=op, threads=threads, num_chunks=num_chunks, row_bytes=paged.row_bytes,
            block_bytes=paged.block_size * paged.row_bytes, layers=paged.num_layers, bytes=nbytes,
            seconds=s["median"], seconds_min=s["min"], seconds_max=s["max"],
            copy_seconds=c["median"], copy_min=c["min"], copy_max=c["max"], loop_seconds=lp["median"],
            gbps=nbytes / s["median"] / 1e9, copy_gbps=nbytes / c["median"] / 1e9,
            loop_gbps=nbytes / lp["median"] / 1e9, ratio_vs_copy=paired["median"],
            ratio_vs_copy_min=paired["min"], ratio_vs_copy_max=paired["max"],
            ratio_vs_copy_q1=q1, ratio_vs_copy_q3=q3,
            ratio_vs_loop=lp["median"] / s["median"], ratio_vs_numpy_path=vs_numpy,
            goal=GOALS[slots_kind], backend=chosen,
            device=device_name(device), repeats=repeats, loadavg_1m=load_average()[0]))
    cpu_copy.close()
    return rows


def _f2(x) -> str:
    return f"{x:.2f}" if x != "" else "-"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys((r["pool"], r["slots"]) for r in rows))
    fig, axes = plt.subplots(len(kinds), 2, figsize=(13, 4.4 * len(kinds)), sharey=True, squeeze=False)
    for i, (pool, kind) in enumerate(kinds):
        for ax, op in zip(axes[i], ("pack", "unpack")):
            sub = [r for r in rows if r["slots"] == kind and r["op"] == op and r["pool"] == pool]
            for key in dict.fromkeys((r["model"], r["layout"], r["threads"]) for r in sub):
                line = [r for r in sub if (r["model"], r["layout"], r["threads"]) == key]
                ratio = [r["ratio_vs_copy"] for r in line]
                ax.errorbar([r["num_chunks"] for r in line], ratio, fmt="o-" if key[2] == 1 else "s--",
                            yerr=[[m - r["ratio_vs_copy_q1"] for m, r in zip(ratio, line)],
                                  [r["ratio_vs_copy_q3"] - m for m, r in zip(ratio, line)]], capsize=2,
                            label=f"{key[0]} [{key[1]}] {line[0]['row_bytes']} B rows, {key[2]} thr")
            ax.axhline(GOALS[kind], color="gray", ls=":", lw=1)
            ax.set_ylim(0, 1.4)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{op}, slots={kind}, {pool} ({rows[0]['device']}, {rows[0]['backend']}, "
                         f"load {min(r['loadavg_1m'] for r in sub):.1f}..{max(r['loadavg_1m'] for r in sub):.1f})")
            ax.set_xlabel("chunks of 256 tokens per call")
        axes[i][0].set_ylabel("memcpy time / gpukv time, same repeat (median, quartiles)")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", choices=["triton", "torch", "ref"], default=None,
                        help="force a backend (default: auto for the device)")
    parser.add_argument("--threads", type=lambda s: [int(x) for x in s.split(",")], default=None,
                        help="comma-separated thread counts (default: the preset's, e.g. 1,2)")
    parser.add_argument("--models", type=lambda s: s.split(","), default=None)
    parser.add_argument("--pools", type=lambda s: s.split(","), default=None,
                        help="dram,cache (default both): DRAM-resident and cache-resident points")
    args = parser.parse_args(argv)
    preset = dict(PRESETS[args.preset])
    if args.threads:
        preset["threads"] = args.threads
    if args.models:
        preset["models"] = args.models
    if torch.device(args.device).type == "cuda":
        preset["threads"] = [preset["threads"][0]]  # the GPU path does not use CPU threads
    settings = {k: os.environ.get(k) for k in THREAD_ENV} | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    print(f"thread settings: {settings}; torch threads per point: {preset['threads']}; "
          f"load average before: {load_average()}")
    if args.pools:
        preset["pools"] = args.pools
    print(describe())
    points = [(m, lay, kind, n, thr, pool) for pool in preset["pools"] for m in preset["models"]
              for lay in preset["layouts"] for kind in preset["slots"] for n in preset["chunks"]
              for thr in preset["threads"] if lay == "nhd" or MODELS[m]["kind"] == "mha"]
    rows, built = [], {}  # the last point's cache, shared by its thread counts
    for model, layout, kind, n, thr, pool in progress(points, desc="kernel sweep"):
        key = (model, layout, kind, n, pool)
        if key not in built:
            built.clear()  # (a DRAM-resident cache is gigabytes: one at a time)
            cache = build(model, layout, kind, n, args.device, pool)
            built[key] = cache, Rotation(len(cache[1]))
        rows += run_point(model, layout, kind, n, thr, args.device, preset["repeats"], args.backend, *built[key])
    out = results_dir(args.device)
    csv_path = write_csv(out / f"sweep_kernels_{args.preset}.csv", rows)
    plot(rows, out / f"sweep_kernels_{args.preset}.png")
    print(f"{'pool':5} {'model':18} {'layout':14} {'slots':6} {'op':6} {'thr':>3} {'chunks':>6} {'row B':>5} "
          f"{'MB':>6} {'GB/s':>6} {'copy':>6} {'x copy':>6} {'(min..max)':>11} {'ms min..max':>15} "
          f"{'x loop':>6} {'x numpy':>7} {'load':>5}")
    for r in rows:
        print(f"{r['pool'].split('-')[0]:5} {r['model']:18} {r['layout']:14} {r['slots']:6} {r['op']:6} {r['threads']:3d} "
              f"{r['num_chunks']:6d} {r['row_bytes']:5d} {r['bytes'] / 1e6:6.1f} {r['gbps']:6.2f} "
              f"{r['copy_gbps']:6.2f} {r['ratio_vs_copy']:6.2f} "
              f"({r['ratio_vs_copy_min']:4.2f}..{r['ratio_vs_copy_max']:4.2f}) "
              f"{r['seconds_min'] * 1e3:7.2f}..{r['seconds_max'] * 1e3:<7.2f} {r['ratio_vs_loop']:6.2f} "
              f"{_f2(r['ratio_vs_numpy_path']):>7} {r['loadavg_1m']:5.2f}")
    for pool in dict.fromkeys(r["pool"] for r in rows):
        for kind in dict.fromkeys(r["slots"] for r in rows):
            for thr in dict.fromkeys(r["threads"] for r in rows):
                sub = [r["ratio_vs_copy"] for r in rows
                       if r["slots"] == kind and r["threads"] == thr and r["pool"] == pool]
                print(f"{pool} slots={kind} threads={thr}: x copy min {min(sub):.2f} median "
                      f"{sorted(sub)[len(sub) // 2]:.2f} max {max(sub):.2f} (goal {GOALS[kind]})")
    print(f"backend {rows[0]['backend']} on {rows[0]['device']}; thread settings {settings}; "
          f"load average after: {load_average()}; wrote {csv_path} and {csv_path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
