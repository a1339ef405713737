"""What the metrics cost a LOOKUP: an in-process lookup handler on an engine with
``EngineConfig(metrics=True)`` (its books call :class:`gpukv.ops.metrics.CacheMetrics`) against
the same on one with ``metrics=False``, measured in the same run.

* two handlers: ``server`` = ``CacheEngine.lookup_hashes`` on precomputed chunk hashes (what the
  server's LOOKUP handler runs after decoding a request) and ``embedded`` =
  ``CacheEngine.lookup`` on token ids (hashes the prompt too: what an in-process connector
  calls). A tiny MLA model whose 128-chunk prompt is in L1 of both engines, so every lookup hits
  ``chunks`` chunks and takes their shares.
* ``off`` (the baseline): the engine with metrics off; ``on`` (the subject): metrics on.

Each call is timed alone (shares released after it, untimed); a block is ``lookups`` calls and
its median is one sample; ``off`` and ``on`` blocks alternate ABAB / BABA within every repeat.
Reports min / median / max per-lookup microseconds, the ratio on / off of the medians (goal:
<= 1.05) and the absolute nanoseconds of each metrics call on its own. Thread settings and the
load average are printed: on a shared 2-core machine the spread matters more than one number.
The end-to-end cost (a LOOKUP through a server with metrics on vs off) is in sweep_server.

    python perf/sweep_metrics.py --preset quick    # ~20 s
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import progress, results_dir, write_csv  # noqa: E402

from gpukv import CacheEngine, EngineConfig  # noqa: E402
from gpukv.engine.keys import chunk_hashes, request_seed  # noqa: E402
from gpukv.ops.metrics import CacheMetrics  # noqa: E402

PRESETS = {
    "quick": dict(chunks=[1, 8, 32, 128], lookups=200, repeats=6, calls=20000),
    "full": dict(chunks=[1, 2, 4, 8, 16, 32, 64, 128], lookups=1000, repeats=10, calls=200000),
}
CHUNK = 256
BLOCK = 16
MODEL = "lookup-model"


def make_engine(metrics: bool) -> tuple[CacheEngine, list[int], list[bytes]]:
    """An engine holding one 128-chunk prompt of a tiny MLA model (lookups touch no bytes)."""
    num_tokens = 128 * CHUNK
    pages = [torch.zeros(num_tokens // BLOCK, BLOCK, 64, dtype=torch.bfloat16)]
    engine = CacheEngine(EngineConfig(capacity_bytes=64 << 20, device="cpu", chunk_size=CHUNK,
                                      metrics=metrics))
    engine.register("w0", MODEL, pages, "NB,BS,D", kind="mla")
    tokens = list(range(num_tokens))
    assert engine.store("w0", tokens, torch.arange(num_tokens)) == num_tokens
    return engine, tokens, chunk_hashes(tokens, CHUNK, seed=request_seed(engine.config.salt, b""))


def lookup_block(engine: CacheEngine, prompt: list, lookups: int, handler: str) -> float:
    """Median seconds of one lookup over ``lookups`` calls. ``handler``: ``"server"`` looks up
    precomputed hashes, ``"embedded"`` hashes token ids."""
    times = []
    tokens = len(prompt) * CHUNK if handler == "server" else len(prompt)
    lookup = engine.lookup_hashes if handler == "server" else engine.lookup
    clock = time.perf_counter
    for i in range(lookups):
        rid = f"r{i}"
        t0 = clock()
        hits = lookup(MODEL, prompt, request_id=rid)
        times.append(clock() - t0)
        assert hits == tokens
        engine.end_session(rid)
    return statistics.median(times)


def call_cost(fn: Callable[[], None], calls: int, repeats: int) -> list[float]:
    """Nanoseconds per call, one sample per repeat."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        out.append((time.perf_counter() - t0) / calls * 1e9)
    return out


def summary(values: list[float]) -> tuple[float, float, float]:
    return min(values), statistics.median(values), max(values)


def run(preset: dict) -> tuple[list[dict], list[dict]]:
    (off, tokens, hashes), (on, _, _) = make_engine(False), make_engine(True)
    assert off.core.observer.metrics is None and on.core.observer.metrics is not None
    engines = {"off": off, "on": on}
    rows = []
    points = [(handler, chunks) for handler in ("server", "embedded") for chunks in preset["chunks"]]
    for handler, chunks in progress(points, desc="lookup with/without metrics"):
        prompt = hashes[:chunks] if handler == "server" else tokens[:chunks * CHUNK]
        samples = {"off": [], "on": []}
        for engine in engines.values():  # warm-up, both
            lookup_block(engine, prompt, 20, handler)
        for r in range(preset["repeats"]):
            order = ("off", "on") if r % 2 == 0 else ("on", "off")
            for name in order:
                samples[name].append(lookup_block(engines[name], prompt, preset["lookups"],
                                                  handler) * 1e6)
        off, on = summary(samples["off"]), summary(samples["on"])
        rows.append(dict(handler=handler, chunks=chunks, off_min_us=off[0], off_median_us=off[1],
                         off_max_us=off[2], on_min_us=on[0], on_median_us=on[1],
                         on_max_us=on[2], ratio=on[1] / off[1], overhead_us=on[1] - off[1],
                         loadavg_1m=round(os.getloadavg()[0], 2)))
    for engine in engines.values():
        engine.close()
    m = CacheMetrics()
    m.add_model(MODEL)
    calls = {
        "lookup, 1 tier": lambda: m.lookup(MODEL, 4096, {"L1": 4096}, 1e-4),
        "lookup, 3 tiers": lambda: m.lookup(MODEL, 4096, {"L1": 1024, "disk": 1024,
                                                          "remote": 1024}, 1e-4),
        "lookup, model not added": lambda: m.lookup("stranger", 4096, {"L1": 4096}, 1e-4),
        "store": lambda: m.store(MODEL, 16, 16 << 20, 1e-3),
        "evicted": lambda: m.evicted("cpu", 4),
        "empty call (loop floor)": lambda: None,
    }
    cost_rows = []
    for name, fn in calls.items():
        lo, med, hi = summary(call_cost(fn, preset["calls"], preset["repeats"]))
        cost_rows.append(dict(call=name, min_ns=lo, median_ns=med, max_ns=hi))
    return rows, cost_rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for handler, marker in (("server", "o"), ("embedded", "s")):
        sub = [r for r in rows if r["handler"] == handler]
        x = [r["chunks"] for r in sub]
        for name, style in (("off", "-"), ("on", "--")):
            ax.plot(x, [r[f"{name}_median_us"] for r in sub], marker + style,
                    label=f"{handler}, metrics {name}")
            ax.fill_between(x, [r[f"{name}_min_us"] for r in sub],
                            [r[f"{name}_max_us"] for r in sub], alpha=0.2)
        ax2.plot(x, [r["ratio"] for r in sub], marker + "-", label=handler)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("chunks hit per lookup")
    ax.set_ylabel("in-process lookup, us (median; band min-max)")
    ax.legend(fontsize=8)
    ax2.axhline(1.05, color="gray", lw=0.8, ls=":", label="goal 1.05")
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("chunks hit per lookup")
    ax2.set_ylabel("on / off (medians)")
    ax2.legend()
    fig.suptitle("gpukv LOOKUP cost of the metrics calls (cpu)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (fixed, printed)")
    args = parser.parse_args(argv)
    logging.getLogger("gpukv").setLevel(logging.WARNING)  # the engine logs each lookup at INFO
    torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}, python {sys.version.split()[0]}, "
          f"prometheus_client {version('prometheus-client')}, "
          f"load average {os.getloadavg()[0]:.2f} at start")
    rows, cost_rows = run(PRESETS[args.preset])
    out = results_dir("cpu")
    csv_path = write_csv(out / "sweep_metrics.csv", rows)
    write_csv(out / "sweep_metrics_calls.csv", cost_rows)
    plot(rows, out / "sweep_metrics.png")
    print(f"{'handler':8} {'chunks':>6} {'off us min/med/max':>22} {'on us min/med/max':>22} {'on/off':>6} "
          f"{'+us':>6}")
    for r in rows:
        print(f"{r['handler']:8} {r['chunks']:6d} {r['off_min_us']:6.1f} {r['off_median_us']:6.1f} "
              f"{r['off_max_us']:7.1f}  {r['on_min_us']:6.1f} {r['on_median_us']:6.1f} "
              f"{r['on_max_us']:7.1f} {r['ratio']:6.3f} {r['overhead_us']:6.2f}")
    print(f"{'metrics call':26} {'ns min/med/max':>22}")
    for r in cost_rows:
        print(f"{r['call']:26} {r['min_ns']:6.0f} {r['median_ns']:6.0f} {r['max_ns']:7.0f}")
    worst = max(r["ratio"] for r in rows)
    print(f"worst on/off ratio {worst:.3f} (goal <= 1.05); load average {os.getloadavg()[0]:.2f} "
          f"at end; wrote {csv_path}, sweep_metrics_calls.csv and sweep_metrics.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
