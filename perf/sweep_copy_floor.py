"""What a gather in vLLM's order costs without gpukv: the floor under pack's and unpack's memcpy
ratios (CPU).

Issue 15 asks pack / unpack to reach 0.9x memcpy for whole blocks and 0.6x for random token
slots. This sweep measures, on the same memory and in the same repeats, what simpler programs
reach for the same copy (the pages of ``layers`` layers, ``NB,BS,D`` of ``row`` bytes, 4 chunks
of 256 tokens, block size 16; on a DRAM-resident pool and on a cache-resident one, see
perf/pools.py), in both directions (pack: pages -> arena, a gather; unpack: arena -> pages, a
scatter):

  memcpy      one contiguous copy of the same bytes (the baseline of every ratio)
  gpukv       ``gpukv.paged.copy.pack`` / ``unpack`` (the torch CPU path)
  numpy       ``numpy.take`` / ``put`` of the same items (void dtype: one memmove each), per layer
  c           a C loop, one ``memcpy`` per item, in the same order (gpukv's compiled gather,
              :mod:`gpukv.paged.native`, prefetch off, one prepared batch of all layers)
  c_prefetch  the same loop prefetching the first line of the item 16 ahead (native.AHEAD: its
              page's translation and first line start early)
  c_stream    the same with streaming stores (whole 64-byte lines straight to memory: what pack
              runs when the CPU has AVX-512, and unpack for large calls)

Items: ``tokens`` = random token slots (item = one row); ``blocks`` = whole blocks in random order
(item = 16 rows). ``c`` shows what the memory system costs for jumping between items without
prefetch; ``c_prefetch`` what software prefetch buys; ``c_stream`` what skipping the read of each
written line buys; gpukv against the best C loop is the cost of the planning around the copy
(index math, groups, threads).

``--huge-pages`` allocates every tensor on 2 MiB pages (torch's ``THP_MEM_ALLOC_ENABLE=1``; the
share the kernel backed is printed and kept): the same loops with one page-table walk per 2 MiB
instead of per 4 KiB, which shows how much of a random gather is address translation. Its CSV is
``sweep_copy_floor_hugepages_<preset>.csv``.

1 torch thread, OMP_WAIT_POLICY=PASSIVE; the subjects are timed in turn within every repeat;
ratios = memcpy time / subject time of the same repeat, median (min..max). Without a C compiler
the C columns are empty (and gpukv uses numpy).
"""

from __future__ import annotations

import os
import sys

THREAD_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_NUM_THREADS": "1"}
for _k, _v in THREAD_ENV.items():
    os.environ.setdefault(_k, _v)
if "--huge-pages" in sys.argv:  # read once, at torch's first allocation
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1"

import argparse  # noqa: E402
import statistics  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import fill_random, load_average, results_dir, thread_settings, time_interleaved, write_csv  # noqa: E402
from pools import Rotation, describe, num_sets  # noqa: E402

from gpukv.paged.copy import pack, unpack  # noqa: E402
from gpukv.paged.layout import PagedKV  # noqa: E402
from gpukv.paged.native import AHEAD, native_copy  # noqa: E402

CHUNK, CHUNKS, BLOCK, POOL = 256, 4, 16, 2  # POOL: a cache-resident point's pages / one call's
TARGET_BYTES = 64 << 20  # bytes moved per call (layers chosen to reach it)
PRESETS = {"quick": dict(rows=[256, 656, 1152, 2048], repeats=9),
           "full": dict(rows=[128, 256, 512, 656, 1152, 2048, 4096], repeats=15)}
SUBJECTS = ("gpukv", "numpy", "c", "c_prefetch", "c_stream")


def huge_page_share(nbytes: int) -> float:
    """The share of ``nbytes`` the kernel backs with huge pages in this process (smaps_rollup)."""
    try:
        line = next(ln for ln in open("/proc/self/smaps_rollup") if ln.startswith("AnonHugePages"))
    except (OSError, StopIteration):
        return float("nan")
    return min(1.0, int(line.split()[1]) * 1024 / nbytes)


def run_point(row: int, items: str, repeats: int, gather, pool: str, pages: str) -> list[dict]:
    tokens = CHUNKS * CHUNK
    num_layers = max(4, TARGET_BYTES // (tokens * row))
    nbytes = tokens * num_layers * row
    k = num_sets(pool, nbytes)  # disjoint sets of pages and arena windows, taken in turn
    num_blocks = (POOL if k == 1 else k) * tokens // BLOCK
    layers = [fill_random(torch.empty(num_blocks, BLOCK, row, dtype=torch.uint8), seed=i) for i in range(num_layers)]
    paged = PagedKV.from_tensors(layers, "NB,BS,D", kind="mla")
    gen = torch.Generator().manual_seed(row)
    if items == "blocks":
        idx = torch.randperm(num_blocks, generator=gen)[: k * tokens // BLOCK].view(k, -1)
        slots = (idx[:, :, None] * BLOCK + torch.arange(BLOCK)).view(k, -1)
        item, per_chunk = BLOCK * row, CHUNK // BLOCK
    else:
        idx = slots = torch.randperm(num_blocks * BLOCK, generator=gen)[: k * tokens].view(k, -1)
        item, per_chunk = row, CHUNK
    # written before timing: an untouched window would time its page faults, not the copy
    arena = torch.empty(k * nbytes, dtype=torch.uint8).fill_(1)
    offsets = [torch.arange(CHUNKS, dtype=torch.int64) * (nbytes // CHUNKS) + i * nbytes for i in range(k)]
    if k == 1:
        src, dst = torch.empty(nbytes, dtype=torch.uint8).random_(0, 256), torch.empty(nbytes, dtype=torch.uint8)
    backed = huge_page_share(num_blocks * BLOCK * row * num_layers + arena.numel()) if pages == "2 MiB" else 0.0
    turn = Rotation(k)  # every call takes the next set: no call finds its memory in a cache

    def memcpy() -> None:
        if k == 1:
            np.copyto(dst.numpy(), src.numpy())
            return
        i = turn()
        j = (i + k // 2) % k
        np.copyto(arena[j * nbytes:(j + 1) * nbytes].numpy(), arena[i * nbytes:(i + 1) * nbytes].numpy())

    # numpy.take / put over each layer's items as opaque (void) values, that chunk-layer's slab
    voids = [t.numpy().reshape(-1).view(f"V{item}") for t in layers]
    out = arena.numpy().view(f"V{item}").reshape(k, CHUNKS, num_layers, per_chunk)
    idx_np = idx.numpy().reshape(k, CHUNKS, per_chunk)

    def numpy_copy(to_arena: bool) -> None:
        i = turn()
        for c in range(CHUNKS):
            for layer in range(num_layers):
                if to_arena:
                    np.take(voids[layer], idx_np[i, c], out=out[i, c, layer])
                else:
                    voids[layer].put(idx_np[i, c], out[i, c, layer])

    def gpukv_copy(to_arena: bool) -> None:
        i = turn()
        (pack if to_arena else unpack)(paged, slots[i], arena, offsets[i], chunk_size=CHUNK, backend="torch")

    if gather is not None:  # prepared batches of every (chunk, layer): the loop alone is timed
        batches = [gather.batch([(voids[layer].ctypes.data, len(voids[layer]), out[i, c, layer].ctypes.data,
                                  idx_np[i, c]) for c in range(CHUNKS) for layer in range(num_layers)], item)
                   for i in range(k)]
    points = []
    for op in ("pack", "unpack"):
        to_arena = op == "pack"
        fns = {"memcpy": memcpy, "gpukv": lambda t=to_arena: gpukv_copy(t),
               "numpy": lambda t=to_arena: numpy_copy(t)}
        if gather is not None:
            fns["c"] = lambda t=to_arena: gather.run(batches[turn()], to_rows=t, ahead=0)
            fns["c_prefetch"] = lambda t=to_arena: gather.run(batches[turn()], to_rows=t, ahead=AHEAD)
            if gather.nontemporal:
                fns["c_stream"] = lambda t=to_arena: gather.run(batches[turn()], to_rows=t, ahead=AHEAD,
                                                                nontemporal=True)
        load_before = load_average()[0]
        times = time_interleaved(fns, "cpu", repeats)
        point = dict(pool="cache-resident" if k == 1 else "DRAM-resident",
                     pool_mbytes=round((k if k > 1 else POOL) * nbytes / 1e6), pages=pages,
                     huge_page_share=round(backed, 3), op=op,
                     items=items, row_bytes=row, item_bytes=item, layers=num_layers, mbytes=round(nbytes / 1e6, 1),
                     memcpy_gbs=round(nbytes / statistics.median(times["memcpy"]) / 1e9, 2))
        for name in SUBJECTS:
            if name not in times:
                point[name] = point[f"{name}_span"] = ""
                continue
            ratios = [a / b for a, b in zip(times["memcpy"], times[name])]
            point[name] = round(statistics.median(ratios), 3)
            point[f"{name}_span"] = f"{min(ratios):.2f}..{max(ratios):.2f}"
        point["load_avg"] = f"{load_before:.2f}..{load_average()[0]:.2f}"
        points.append(point)
    return points


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), default="quick")
    parser.add_argument("--pools", default="dram,cache",
                        help="dram,cache: DRAM-resident and cache-resident points (see perf/pools.py)")
    parser.add_argument("--huge-pages", action="store_true",
                        help="every tensor on 2 MiB pages (THP_MEM_ALLOC_ENABLE=1): address translation's share")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    preset = PRESETS[args.preset]
    pages = "2 MiB" if args.huge_pages else "4 KiB"
    gather = native_copy()
    built = "none (no compiler): C columns skipped"
    if gather is not None:
        built = "built, streaming stores " + ("on" if gather.nontemporal else "unavailable (no AVX-512): column skipped")
    print(f"# {thread_settings()}; compiled gather: {built}; pages: {pages}")
    print(f"# load average {load_average()}; ratios = memcpy time / subject time, median (min..max)")
    print(f"# {describe()}")
    print(f"{'pool':>5} {'op':>6} {'items':>6} {'row B':>6} {'item B':>7} {'MB':>6} {'memcpy GB/s':>11} | "
          + " ".join(f"{n:>16}" for n in ("gpukv", "numpy", "C memcpy loop", "C + prefetch", "C + streaming")))
    rows = []
    for pool in args.pools.split(","):
        for items in ("tokens", "blocks"):
            for row in preset["rows"]:
                for r in run_point(row, items, preset["repeats"], gather, pool, pages):
                    rows.append(r)
                    cells = " ".join(f"{r[n]!s:>6} ({r[n + '_span']:>9})" if r[n] != "" else f"{'-':>16}"
                                     for n in SUBJECTS)
                    print(f"{r['pool'].split('-')[0]:>5} {r['op']:>6} {items:>6} {row:>6} {r['item_bytes']:>7} "
                          f"{r['mbytes']:>6} {r['memcpy_gbs']:>11} | {cells}", flush=True)
    if args.huge_pages:
        print(f"# share of the pages and arena on huge pages: "
              f"{min(r['huge_page_share'] for r in rows):.2f}..{max(r['huge_page_share'] for r in rows):.2f}")
    name = "sweep_copy_floor_hugepages" if args.huge_pages else "sweep_copy_floor"
    path = write_csv(results_dir("cpu") / f"{name}_{args.preset}.csv", rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
