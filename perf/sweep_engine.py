"""Engine overhead: store / retrieve GB/s through CacheEngine vs the raw pack/unpack kernels.

For MLA (DeepSeek-V3-like rows) and MHA (Llama-3.1-8B-like) at 2k..32k tokens, in the same run:
  engine store    = hash + L1 reserve + pack + finish (+ spill bookkeeping when tiers exist)
  engine retrieve = hash + share checks + unpack + release (after an untimed lookup)
  raw pack/unpack = the kernels alone on the same slots and the same L1 offsets
Reports GB/s and ratio = engine GB/s / raw GB/s (goal >= 0.8 at 8k tokens and above).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import bench, progress, results_dir, write_csv  # noqa: E402

from gpukv import CacheEngine, EngineConfig  # noqa: E402
from gpukv.paged.copy import pack, unpack  # noqa: E402
from gpukv.engine.keys import chunk_hashes  # noqa: E402

PRESETS = {
    "quick": dict(tokens=[2048, 8192], layers={"mla": 16, "mha": 8}, repeats=3),
    "full": dict(tokens=[2048, 8192, 16384, 32768], layers={"mla": 61, "mha": 32}, repeats=5),
}
SHAPES = {  # per-layer page shape given num_blocks, dims, block size
    "mla": dict(dims="NB,BS,D", block_size=64, row=lambda nb: (nb, 64, 576)),
    "mha": dict(dims="NB,2,BS,H,D", block_size=16, row=lambda nb: (nb, 2, 16, 8, 128)),
}


def run_point(kind: str, num_tokens: int, num_layers: int, device: str, repeats: int,
              chunk_size: int = 256) -> dict:
    spec = SHAPES[kind]
    nb = num_tokens // spec["block_size"]
    pages = [torch.empty(spec["row"](nb), dtype=torch.bfloat16, device=device) for _ in range(num_layers)]
    for p in pages:
        p.view(torch.int16).random_(-1000, 1000)
    slots = torch.arange(num_tokens, dtype=torch.int64)
    tokens = list(range(num_tokens))
    engine = CacheEngine(EngineConfig(capacity_bytes=_capacity(pages), device=device,
                                      chunk_size=chunk_size))
    engine.register("w0", "m", pages, spec["dims"], kind=kind)
    nbytes = sum(p.numel() * p.element_size() for p in pages) * num_tokens // (nb * spec["block_size"])

    def store():
        engine.clear_l1()
        assert engine.store("w0", tokens, slots) == num_tokens

    t_store = bench(store, device=device, repeats=repeats, warmup=1)
    # raw pack into the very offsets the engine uses
    keys = engine._keys("m", 0, chunk_hashes(tokens, chunk_size))
    arena, offsets = engine.l1.locate(keys)
    paged = engine._instances["w0"].paged
    t_pack = bench(lambda: pack(paged, slots, arena, offsets, chunk_size=chunk_size), device=device,
                   repeats=repeats, warmup=1)
    t_unpack = bench(lambda: unpack(paged, slots, arena, offsets, chunk_size=chunk_size), device=device,
                     repeats=repeats, warmup=1)
    counter = itertools.count()

    def retrieve():
        req = f"r{next(counter)}"
        engine.lookup("m", tokens, request_id=req)
        return req

    times = []
    for _ in range(repeats + 1):
        req = retrieve()
        t = bench(lambda: engine.retrieve("w0", tokens, slots, request_id=req), device=device,
                  repeats=1, warmup=0)
        engine.end_session(req)
        times.append(t)
    t_retrieve = sorted(times[1:])[len(times[1:]) // 2]
    engine.close()
    gb = nbytes / 1e9
    return dict(kind=kind, tokens=num_tokens, layers=num_layers, bytes=nbytes, device=device,
                store_gbps=gb / t_store, pack_gbps=gb / t_pack, store_ratio=t_pack / t_store,
                retrieve_gbps=gb / t_retrieve, unpack_gbps=gb / t_unpack,
                retrieve_ratio=t_unpack / t_retrieve)


def _capacity(pages) -> int:
    total = sum(p.numel() * p.element_size() for p in pages)
    return int(total * 1.25) + (64 << 20)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for kind in sorted({r["kind"] for r in rows}):
        sub = [r for r in rows if r["kind"] == kind]
        x = [r["tokens"] for r in sub]
        ax.plot(x, [r["store_ratio"] for r in sub], "o-", label=f"{kind} store / pack")
        ax.plot(x, [r["retrieve_ratio"] for r in sub], "s--", label=f"{kind} retrieve / unpack")
    ax.axhline(0.8, color="gray", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per call")
    ax.set_ylabel("engine GB/s / raw kernel GB/s")
    ax.set_title(f"gpukv engine overhead ({rows[0]['device']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    rows = []
    points = [(k, t) for k in ("mla", "mha") for t in preset["tokens"]]
    for kind, tokens in progress(points, desc="engine sweep"):
        rows.append(run_point(kind, tokens, preset["layers"][kind], args.device, preset["repeats"]))
    out = results_dir(args.device)
    csv_path = write_csv(out / "sweep_engine.csv", rows)
    plot(rows, out / "sweep_engine.png")
    print(f"{'kind':4} {'tokens':>6} {'store GB/s':>10} {'pack GB/s':>9} {'ratio':>5} "
          f"{'retr GB/s':>9} {'unpack GB/s':>11} {'ratio':>5}")
    for r in rows:
        print(f"{r['kind']:4} {r['tokens']:6d} {r['store_gbps']:10.2f} {r['pack_gbps']:9.2f} "
              f"{r['store_ratio']:5.2f} {r['retrieve_gbps']:9.2f} {r['unpack_gbps']:11.2f} "
              f"{r['retrieve_ratio']:5.2f}")
    print(f"wrote {csv_path} and {out / 'sweep_engine.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
