"""PING while a maximal LOOKUP runs: the issue's "PING answered within 50 ms while a maximal
request is processed", measured against the same client's PING to the same server when it is
idle, in the same run.

A ``gpukv serve`` process (4 pool threads, ``ServerProcess``'s default) holds a tiny MLA model
(one layer, 8 bf16 per token) with the most chunks one request may name (``MAX_HASHES`` =
131072). One client looks them all up at ``tp_size=128`` (share bookkeeping for 131072 objects x
128 readers in a pool thread, ~45 ms here; the request is ended after each block) while a second
client pings back to back; a block is one lookup and the pings answered during it. The baseline
block: the same number of pings with no lookup running. ``idle`` and ``lookup`` blocks alternate
ABAB / BABA within every repeat. Reports per repeat the worst and median ping of both (so the
ratio of the medians and the worst under a lookup, against 50 ms), the lookup's own time and how
many pings it overlapped.

    python perf/sweep_ping_under_lookup.py --preset quick    # ~1 minute
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import load_average, progress, results_dir, run_info, write_csv  # noqa: E402

from gpukv.frontend import protocol as p  # noqa: E402
from gpukv.frontend.client import CacheClient  # noqa: E402
from gpukv.frontend.process import ServerProcess  # noqa: E402

PRESETS = {"quick": dict(repeats=6), "full": dict(repeats=20)}
CHUNK = 16
MAX = p.MAX_HASHES
TINY_CHUNK = CHUNK * 8 * 2
GOAL_S = 0.050


def store_all(address: str) -> list[bytes]:
    """Register the tiny model with tp_size 128 and store MAX chunks; their hashes."""
    with CacheClient(address, timeout_s=300) as c:
        pages = torch.zeros(64, CHUNK, 8, dtype=torch.bfloat16)
        pages.view(torch.int16).random_(-(1 << 15), 1 << 15)
        c.register("tiny", "tiny", [pages], "NB,BS,D", kind="mla", tp_size=128)
        tokens = torch.arange(MAX * CHUNK)
        slots = tokens % (64 * CHUNK)
        half = MAX // 2 * CHUNK
        assert c.store("tiny", tokens[:half], slots[:half]) == half  # one store: half the arena
        assert c.store("tiny", tokens, slots) == MAX * CHUNK - half
        return c.copies.hashes(tokens)  # the hashes the lookups name


def lookup_block(big: CacheClient, other: CacheClient, hashes: list[bytes]) -> dict:
    """One maximal lookup in a thread, pings from ``other`` until it returns."""
    done, out = threading.Event(), {}

    def maximal() -> None:
        t0 = time.perf_counter()
        out["hits"] = big.lookup_hashes("tiny", hashes, request_id="max", tp_size=128)
        out["lookup_s"] = time.perf_counter() - t0
        done.set()

    thread = threading.Thread(target=maximal)
    thread.start()
    pings = []
    while not done.is_set():
        t0 = time.perf_counter()
        other.ping()
        pings.append(time.perf_counter() - t0)
    thread.join()
    assert out["hits"] == MAX * CHUNK, out
    big.end_session("max")  # shares back: every lookup starts from the same state
    return dict(pings=pings, lookup_s=out["lookup_s"])


def idle_block(other: CacheClient, count: int) -> list[float]:
    pings = []
    for _ in range(max(count, 5)):
        t0 = time.perf_counter()
        other.ping()
        pings.append(time.perf_counter() - t0)
    return pings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    args = parser.parse_args(argv)
    repeats = PRESETS[args.preset]["repeats"]
    torch.set_num_threads(1)
    info = run_info()
    print(f"sweep_ping_under_lookup {args.preset}: {repeats} repeats, {MAX} chunks x tp 128; "
          f"{info['threads']}; load average {load_average()}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpukv-ping-") as tmp, \
            ServerProcess(f"ipc://{tmp}/gpukv.sock", capacity_bytes=MAX * TINY_CHUNK + (8 << 20),
                          chunk_size=CHUNK, worker_timeout_s=30.0) as server:
        hashes = store_all(server.address)
        with CacheClient(server.address, timeout_s=300) as big, CacheClient(server.address) as other:
            lookup_block(big, other, hashes)  # warm-up: the first pays the server's GC walk
            for r in progress(range(repeats), desc="repeats"):
                order = ("idle", "lookup") if r % 2 == 0 else ("lookup", "idle")
                got = {}
                for name in order:
                    if name == "lookup":
                        got["lookup"] = lookup_block(big, other, hashes)
                    else:
                        during = len(got.get("lookup", {}).get("pings", []))
                        got["idle"] = idle_block(other, during or 20)
                under, idle = got["lookup"]["pings"], got["idle"]
                row = dict(repeat=r, order="/".join(order), lookup_ms=got["lookup"]["lookup_s"] * 1e3,
                           pings_during=len(under), worst_ping_ms=max(under) * 1e3,
                           median_ping_ms=statistics.median(under) * 1e3,
                           idle_worst_ms=max(idle) * 1e3, idle_median_ms=statistics.median(idle) * 1e3,
                           median_ratio=statistics.median(under) / statistics.median(idle),
                           goal_worst_ms=GOAL_S * 1e3, loadavg_1m=load_average()[0])
                rows.append(row)
                print(f"  repeat {r} ({row['order']}): lookup {row['lookup_ms']:.0f} ms, "
                      f"{len(under)} pings during it, worst {row['worst_ping_ms']:.1f} ms "
                      f"(idle {row['idle_worst_ms']:.1f}), median {row['median_ping_ms']:.2f} ms "
                      f"= {row['median_ratio']:.1f}x idle", flush=True)
    worst = [r["worst_ping_ms"] for r in rows]
    print(f"worst ping under a maximal lookup: median {statistics.median(worst):.1f} ms, max "
          f"{max(worst):.1f} ms over {repeats} repeats (goal {GOAL_S * 1e3:.0f} ms); median ping "
          f"{statistics.median(r['median_ratio'] for r in rows):.1f}x idle", flush=True)
    path = write_csv(results_dir("cpu") / "sweep_ping_under_lookup.csv", rows)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
