"""Run every perf sweep with one preset and write a Markdown summary per device.

    python perf/run_all.py --preset quick            # CPU: a few minutes
    python perf/run_all.py --preset full --device cuda

Each sweep writes its CSV and PNG into perf/results/<device>/; this script then reads them back
and writes perf/results/<device>/summary.md with the headline ratios against the baselines that
were measured in the same runs. A sweep that fails is reported and makes the exit code non-zero;
the others still run. Sweeps whose optional dependency is missing (Redis, transformers) are skipped.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import results_dir  # noqa: E402

HERE = Path(__file__).parent
SWEEPS = ["sweep_kernels", "sweep_l1", "sweep_engine", "sweep_server", "sweep_remote", "sweep_ttft"]
DEVICE_AWARE = {"sweep_kernels", "sweep_l1", "sweep_engine"}  # the others measure CPU-side paths


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def _first(out: Path, *names: str) -> list[dict]:
    for name in names:
        rows = _rows(out / name)
        if rows:
            return rows
    return []


def _med(values) -> float:
    values = [float(v) for v in values]
    return statistics.median(values) if values else float("nan")


def _section(title: str, header: list[str], rows: list[tuple]) -> list[str]:
    """A Markdown section with one table; nothing when there are no rows."""
    if not rows:
        return []
    lines = ["", f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]


def summarize(out: Path, device: str, preset: str, status: dict[str, str]) -> str:
    lines = [f"# gpukv perf summary: {device} ({preset} preset)", "",
             "Ratios compare against a baseline measured in the same run; absolute numbers on shared "
             "machines are noise.", "", "| sweep | status |", "|---|---|"]
    lines += [f"| {name} | {state} |" for name, state in status.items()]
    kern = _first(out, f"sweep_kernels_{preset}.csv", "sweep_kernels_quick.csv", "sweep_kernels_full.csv")
    rows = []
    for model, layout in dict.fromkeys((r["model"], r.get("layout", "")) for r in kern):
        for op in ("pack", "unpack"):
            sub = [r for r in kern if r["model"] == model and r.get("layout", "") == layout and r["op"] == op]
            rows.append((model, layout, sub[0]["row_bytes"], op, f"{_med(r['gbps'] for r in sub):.2f}",
                         f"{_med(r['ratio_vs_copy'] for r in sub):.2f}", f"{_med(r['ratio_vs_loop'] for r in sub):.2f}"))
    lines += _section("pack / unpack (`sweep_kernels`, medians over 1..64 chunks per call)",
                      ["model", "layout", "row B", "op", "GB/s", "x plain copy", "x per-layer torch loop"], rows)
    l1 = _first(out, f"sweep_l1_{preset}.csv", "sweep_l1_quick.csv", "sweep_l1_full.csv")
    rows = []
    for extra in ("0", "7", "127"):
        sub = [r for r in l1 if r["op"] == "read" and r["extra_count"] == extra and r["eviction"] == "off"]
        if sub:
            rows.append(("reserve+finish read", extra, f"{_med(r['us_per_key'] for r in sub):.2f}",
                         f"{_med(r['vs_extra0'] for r in sub):.2f}", f"{_med(r['speedup_vs_loop'] for r in sub):.1f}"))
    lines += _section("L1 shares (`sweep_l1`)", ["op", "extra_count", "µs per key (median over batches)",
                                                 "vs extra_count 0", "x per-share loop"], rows)
    lines += _section("engine overhead (`sweep_engine.csv`)",
                      ["kind", "tokens", "store / pack", "retrieve / unpack"],
                      [(r["kind"], r["tokens"], f"{float(r['store_ratio']):.2f}", f"{float(r['retrieve_ratio']):.2f}")
                       for r in _first(out, "sweep_engine.csv")])
    lines += _section("server LOOKUP latency (`sweep_server_lookup.csv`, ipc://)",
                      ["clients", "chunks", "server p50 µs", "p99 µs", "embedded p50 µs", "zmq echo p50 µs"],
                      [(r["clients"], r["chunks"], r["server_p50_us"], r["server_p99_us"], r["embedded_p50_us"],
                        r["echo_p50_us"]) for r in _first(out, "sweep_server_lookup.csv")])
    lines += _section("server STORE / RETRIEVE vs embedded (`sweep_server_transfer.csv`)",
                      ["op", "clients", "tokens", "server GB/s", "embedded GB/s", "ratio"],
                      [(r["op"], r["clients"], r["tokens"], r["server_gbps"], r["embedded_gbps"], r["ratio"])
                       for r in _first(out, "sweep_server_transfer.csv")])
    lines += _section("Redis tier vs raw redis-py (`sweep_remote.csv`)",
                      ["chunks", "value MiB", "store / raw SET", "load / raw GET"],
                      [(r["chunks"], f"{int(r['value_bytes']) / 2**20:.1f}", f"{float(r['store_ratio']):.2f}",
                        f"{float(r['load_ratio']):.2f}") for r in _first(out, "sweep_remote.csv")])
    for path in sorted(out.glob("sweep_ttft_*.csv")):
        lines += _section(f"time to first token (`{path.name}`)",
                          ["prompt", "shared", "TTFT full ms", "TTFT cached ms", "speedup", "round trip / ideal",
                           "logits identical"],
                          [(r["prompt_tokens"], r["shared_frac"], r["ttft_full_ms"], r["ttft_cached_ms"], r["speedup"],
                            r["roundtrip_frac_of_ideal"], r["logits_identical"]) for r in _rows(path)])
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["quick", "full"], default="quick")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", nargs="*", default=None, help=f"a subset of {SWEEPS}")
    args = parser.parse_args(argv)
    status: dict[str, str] = {}
    for name in args.only or SWEEPS:
        if name == "sweep_remote" and shutil.which("redis-server") is None:
            status[name] = "skipped (no redis-server)"
            continue
        cmd = [sys.executable, str(HERE / f"{name}.py"), "--preset", args.preset]
        if name in DEVICE_AWARE:
            cmd += ["--device", args.device]
        t0 = time.perf_counter()
        print(f"== {' '.join(cmd[1:])}", flush=True)
        code = subprocess.call(cmd)
        status[name] = f"ok ({time.perf_counter() - t0:.0f} s)" if code == 0 else f"FAILED (exit {code})"
    out = results_dir(args.device)
    summary = out / "summary.md"
    summary.write_text(summarize(out, args.device, args.preset, status))
    print(summary.read_text())
    print(f"wrote {summary}")
    return 0 if all(not s.startswith("FAILED") for s in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
