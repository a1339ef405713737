"""Engine overhead: store / retrieve GB/s through CacheEngine vs the raw pack/unpack kernels.

For MLA (DeepSeek-V3-like rows) and MHA (Llama-3.1-8B-like) at 2k..32k tokens, in the same run:
  engine store    = hash + L1 reserve + pack + commit (into slots written before: warm)
  engine retrieve = hash + pins + unpack + release (after an untimed lookup)
  raw pack/unpack = the copy alone on the same slots and the very L1 offsets the engine uses
Method: the four are timed in turn within every repeat (store, pack, retrieve, unpack, then the
reverse order), setups untimed (the L1 cleared before a store, a new request looked up before a
retrieve); thread settings fixed and printed; min / median / max kept; the ratio is the median
over repeats of raw time / engine time of the same repeat (goal >= 0.8 at 8k tokens and above);
the load average is printed and kept per point.
"""

from __future__ import annotations

import os

# fixed before torch starts its thread pools (see sweep_kernels): idle OpenMP threads sleep
THREAD_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_NUM_THREADS": "1"}
for _k, _v in THREAD_ENV.items():
    os.environ.setdefault(_k, _v)

import argparse  # noqa: E402
import itertools  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import (load_average, progress, results_dir, spread, thread_settings,  # noqa: E402
                    time_alternating, write_csv)

from gpukv import CacheEngine, EngineConfig  # noqa: E402
from gpukv.paged.copy import pack, unpack  # noqa: E402

PRESETS = {
    "quick": dict(tokens=[2048, 8192], layers={"mla": 16, "mha": 8}, repeats=7),
    "full": dict(tokens=[2048, 8192, 16384, 32768], layers={"mla": 61, "mha": 32}, repeats=9),
}
SHAPES = {  # per-layer page shape given num_blocks, dims, block size
    "mla": dict(dims="NB,BS,D", block_size=64, row=lambda nb: (nb, 64, 576)),
    "mha": dict(dims="NB,2,BS,H,D", block_size=16, row=lambda nb: (nb, 2, 16, 8, 128)),
}
GOAL = 0.8


def run_point(kind: str, num_tokens: int, num_layers: int, device: str, repeats: int,
              chunk_size: int = 256) -> dict:
    spec = SHAPES[kind]
    nb = num_tokens // spec["block_size"]
    pages = [torch.empty(spec["row"](nb), dtype=torch.bfloat16, device=device) for _ in range(num_layers)]
    for p in pages:
        p.view(torch.int16).random_(-1000, 1000)
    slots = torch.arange(num_tokens, dtype=torch.int64, device=device)
    tokens = list(range(num_tokens))
    nbytes = sum(p.numel() * p.element_size() for p in pages)
    engine = CacheEngine(EngineConfig(capacity_bytes=int(nbytes * 1.25) + (64 << 20), device=device,
                                      chunk_size=chunk_size))
    engine.register("w0", "m", pages, spec["dims"], kind=kind)
    assert engine.store("w0", tokens, slots) == num_tokens
    keys = [k for k, _ in engine.object_keys("m", tokens)]
    arena, offsets = engine.l1.locate(keys)  # the raw copies use the engine's own slots
    paged = engine.copies._pages["w0"].paged  # (the worker data path holds the instances)
    requests = itertools.count()
    current: list[str] = []

    def next_request() -> None:
        if current:
            engine.end_session(current.pop())
        current.append(f"r{next(requests)}")
        assert engine.lookup("m", tokens, request_id=current[0]) == num_tokens

    def store() -> None:
        assert engine.store("w0", tokens, slots) == num_tokens

    def retrieve() -> None:
        assert engine.retrieve("w0", tokens, slots, request_id=current[0]) == num_tokens

    times = time_alternating({
        "store": store,
        "pack": lambda: pack(paged, slots, arena, offsets, chunk_size=chunk_size),
        "retrieve": retrieve,
        "unpack": lambda: unpack(paged, slots, arena, offsets, chunk_size=chunk_size),
    }, repeats, setup={"store": engine.clear_l1, "retrieve": next_request}, device=device)
    engine.close()
    gb = nbytes / 1e9
    row = dict(kind=kind, tokens=num_tokens, layers=num_layers, bytes=nbytes, device=device)
    for op, raw in (("store", "pack"), ("retrieve", "unpack")):
        s, r = spread(times[op]), spread(times[raw])
        ratios = spread([b / a for a, b in zip(times[op], times[raw])])
        row.update({f"{op}_gbps": gb / s["median"], f"{op}_gbps_min": gb / s["max"],
                    f"{op}_gbps_max": gb / s["min"], f"{raw}_gbps": gb / r["median"],
                    f"{op}_ratio": ratios["median"], f"{op}_ratio_min": ratios["min"],
                    f"{op}_ratio_max": ratios["max"]})
    row.update(goal=GOAL, repeats=repeats, threads=torch.get_num_threads(),
               loadavg_1m=load_average()[0])
    return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for kind in sorted({r["kind"] for r in rows}):
        sub = [r for r in rows if r["kind"] == kind]
        x = [r["tokens"] for r in sub]
        for op, style in (("store", "o-"), ("retrieve", "s--")):
            med = [r[f"{op}_ratio"] for r in sub]
            ax.errorbar(x, med, yerr=[[m - r[f"{op}_ratio_min"] for m, r in zip(med, sub)],
                                      [r[f"{op}_ratio_max"] - m for m, r in zip(med, sub)]],
                        fmt=style, capsize=3, label=f"{kind} {op} / {'pack' if op == 'store' else 'unpack'}")
    ax.axhline(GOAL, color="gray", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per call")
    ax.set_ylabel("raw copy time / engine time, same repeat")
    ax.set_title(f"gpukv engine overhead ({rows[0]['device']}, median and min..max, "
                 f"load {min(r['loadavg_1m'] for r in rows):.1f}..{max(r['loadavg_1m'] for r in rows):.1f})",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (fixed for the run)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    print(f"thread settings: {thread_settings()}; load average before: {load_average()}")
    rows = []
    points = [(k, t) for k in ("mla", "mha") for t in preset["tokens"]]
    for kind, tokens in progress(points, desc="engine sweep"):
        rows.append(run_point(kind, tokens, preset["layers"][kind], args.device, preset["repeats"]))
    out = results_dir(args.device)
    csv_path = write_csv(out / "sweep_engine.csv", rows)
    plot(rows, out / "sweep_engine.png")
    print(f"{'kind':4} {'tokens':>6} {'store GB/s':>10} {'pack GB/s':>9} {'ratio (min..max)':>17} "
          f"{'retr GB/s':>9} {'unpack GB/s':>11} {'ratio (min..max)':>17} {'load':>5}")
    for r in rows:
        print(f"{r['kind']:4} {r['tokens']:6d} {r['store_gbps']:10.2f} {r['pack_gbps']:9.2f} "
              f"{r['store_ratio']:5.2f} ({r['store_ratio_min']:4.2f}..{r['store_ratio_max']:4.2f}) "
              f"{r['retrieve_gbps']:9.2f} {r['unpack_gbps']:11.2f} {r['retrieve_ratio']:5.2f} "
              f"({r['retrieve_ratio_min']:4.2f}..{r['retrieve_ratio_max']:4.2f}) {r['loadavg_1m']:5.2f}")
    worst = min(min(r["store_ratio"], r["retrieve_ratio"]) for r in rows if r["tokens"] >= 8192)
    print(f"worst median ratio at >= 8k tokens {worst:.2f} (goal >= {GOAL}); thread settings "
          f"{thread_settings()}; load average after: {load_average()}")
    print(f"wrote {csv_path} and {out / 'sweep_engine.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
