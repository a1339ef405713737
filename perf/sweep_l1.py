"""Sweep the L1 manager's host-side bookkeeping: shares with extra_count vs a loop of single shares.

Per batch of keys (1..4096), measured with ``time.perf_counter`` medians (the L1 calls are host
work whatever the arena's device):

- ``read``: ``reserve_read(keys, e)`` + ``finish_read(keys, e)`` for e = 0, 7, 127.
- ``loop`` (the baseline, same run): the reference system's way of taking ``1 + e`` shares, one
  lock call per share: ``1 + e`` calls of ``reserve_read(keys, 0)`` then ``1 + e`` calls of
  ``finish_read(keys, 0)``. (Batched over the keys, so it is a *faster* baseline than one call
  per key per share.)
- ``write``: ``reserve_write(keys)`` + ``finish_write(keys)`` of fresh keys, with eviction off (room
  for every write) and on (the arena is full, every write evicts one LRU object).

Goals: per-key time at e=127 within 1.2x of e=0, and >= 5x faster than the loop at e=127.

    python perf/sweep_l1.py --preset quick     # < ~60 s on a small CPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench, progress, results_dir, write_csv  # noqa: E402

from gpukv.l1 import L1Manager, Status  # noqa: E402
from gpukv.l1.slab import aligned_bytes  # noqa: E402

PRESETS = {
    "quick": dict(batches=[1, 16, 256, 4096], rounds=7, repeats=3),
    "full": dict(batches=[1, 4, 16, 64, 256, 1024, 4096], rounds=15, repeats=5),
}
EXTRAS = [0, 7, 127]
OBJECT_BYTES = 4 << 10


def make_keys(start: int, count: int) -> list[tuple]:
    """Realistic object keys: (model, kv_rank, 16-byte chunk hash)."""
    return [("deepseek-v3", 0, i.to_bytes(16, "little")) for i in range(start, start + count)]


def read_case(batch: int, extra: int, loop: bool, device: str) -> Callable[[], None]:
    l1 = L1Manager(batch * aligned_bytes(OBJECT_BYTES), device=device)
    keys = make_keys(0, batch)
    assert l1.reserve_write(keys, OBJECT_BYTES) == [Status.OK] * batch
    l1.finish_write(keys)
    shares = 1 + extra

    def extra_count() -> None:
        l1.reserve_read(keys, extra, owner="req")
        assert l1.finish_read(keys, extra, owner="req")[-1] is Status.OK

    def one_share_per_call() -> None:
        for _ in range(shares):
            l1.reserve_read(keys, 0, owner="req")
        for _ in range(shares):
            assert l1.finish_read(keys, 0, owner="req")[-1] is Status.OK

    return one_share_per_call if loop else extra_count


def write_case(batch: int, evict: bool, device: str, num_calls: int) -> Callable[[], None]:
    slot = aligned_bytes(OBJECT_BYTES)
    l1 = L1Manager(batch * slot * (1 if evict else num_calls), device=device)
    if evict:  # fill the arena so that each timed write evicts as many objects as it writes
        first = make_keys(1 << 40, batch)
        l1.reserve_write(first, OBJECT_BYTES)
        l1.finish_write(first)
    batches = iter([make_keys(i * batch, batch) for i in range(num_calls)])

    def write() -> None:
        keys = next(batches)
        assert l1.reserve_write(keys, OBJECT_BYTES)[-1] is Status.OK
        l1.finish_write(keys)

    return write


def run(preset: str, device: str) -> list[dict]:
    """Per batch size, every case is timed in interleaved rounds (so load drift from other
    processes hits all cases alike); a case's time is the median over rounds of bench()'s median."""
    cfg = PRESETS[preset]
    rounds, repeats = cfg["rounds"], cfg["repeats"]
    rows = []
    for batch in progress(cfg["batches"], desc="batch sizes"):
        cases = {("read", e, "off"): read_case(batch, e, False, device) for e in EXTRAS}
        cases |= {("loop", e, "off"): read_case(batch, e, True, device) for e in EXTRAS}
        num_calls = rounds * (repeats + 1)
        cases |= {("write", 0, ev): write_case(batch, ev == "on", device, num_calls) for ev in ("off", "on")}
        samples: dict[tuple, list[float]] = {case: [] for case in cases}
        for _ in range(rounds):
            for case, fn in cases.items():
                samples[case].append(bench(fn, repeats=repeats, warmup=1))
        for (op, extra, evict), times in samples.items():
            seconds = statistics.median(times)
            rows.append(dict(op=op, eviction=evict, extra_count=extra,
                             shares_per_key=1 + extra if op != "write" else 0, batch=batch,
                             seconds=seconds, us_per_key=seconds / batch * 1e6))
    by = {(r["op"], r["extra_count"], r["eviction"], r["batch"]): r for r in rows}
    for r in rows:
        if r["op"] == "read":
            r["vs_extra0"] = r["us_per_key"] / by["read", 0, "off", r["batch"]]["us_per_key"]
            r["speedup_vs_loop"] = by["loop", r["extra_count"], "off", r["batch"]]["us_per_key"] / r["us_per_key"]
    return rows


def plot(rows: list[dict], path) -> None:
    fig, (ax_r, ax_w) = plt.subplots(1, 2, figsize=(12, 4.5))
    for op, extra, style in [("read", e, "-o") for e in EXTRAS] + [("loop", e, "--x") for e in EXTRAS[1:]]:
        pts = [(r["batch"], r["us_per_key"]) for r in rows if r["op"] == op and r["extra_count"] == extra]
        label = f"extra_count={extra}" if op == "read" else f"loop of {1 + extra} single shares"
        ax_r.plot(*zip(*pts), style, label=label)
    for evict in ("off", "on"):
        pts = [(r["batch"], r["us_per_key"]) for r in rows if r["op"] == "write" and r["eviction"] == evict]
        ax_w.plot(*zip(*pts), "-o", label=f"eviction {evict}")
    ax_r.set_title("reserve_read + finish_read")
    ax_w.set_title("reserve_write + finish_write")
    for ax in (ax_r, ax_w):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("keys per call")
        ax.set_ylabel("µs per key")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--device", default="cpu", help="arena device: cpu, cuda, cuda:N")
    args = parser.parse_args()
    rows = run(args.preset, args.device)
    out = results_dir(args.device)
    csv_path = write_csv(out / f"sweep_l1_{args.preset}.csv", rows)
    png_path = out / f"sweep_l1_{args.preset}.png"
    plot(rows, png_path)
    by = {(r["op"], r["extra_count"], r["eviction"], r["batch"]): r for r in rows}
    print(f"{'batch':>6} | µs/key read e=0 e=7 e=127 | loop e=7 e=127 | e127/e0 | loop/e127 "
          f"| write evict off on")
    for batch in sorted({r["batch"] for r in rows}):
        us = {k[:3]: r["us_per_key"] for k, r in by.items() if k[3] == batch}
        print(f"{batch:>6} | {us['read', 0, 'off']:>13.2f} {us['read', 7, 'off']:>5.2f} "
              f"{us['read', 127, 'off']:>5.2f} | {us['loop', 7, 'off']:>8.2f} {us['loop', 127, 'off']:>6.1f} "
              f"| {by['read', 127, 'off', batch]['vs_extra0']:>7.2f} "
              f"| {by['read', 127, 'off', batch]['speedup_vs_loop']:>9.1f} "
              f"| {us['write', 0, 'off']:>16.2f} {us['write', 0, 'on']:>5.2f}")
    print(f"csv: {csv_path}\npng: {png_path}")


if __name__ == "__main__":
    main()
