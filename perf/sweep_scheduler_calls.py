"""What a vLLM scheduler step pays for gpukv's lookup: the connector's lookup hook through its
calls thread (:mod:`gpukv.integrations.vllm.calls`, the shipped path) against the same lookup
sent from the scheduler's own thread (the path before it), alternating A B / B A in every repeat,
on a healthy ``gpukv serve`` process; then the same hook while the server is stopped (SIGSTOP).

A 2048-token prefix (8 chunks of 256, a tiny MLA layout) is stored by an engine whose worker is
registered; each call is the first ``num_new_matched_tokens`` of a fresh request (a hit: shares
taken), followed by its end (sent, not waited for, on the calls path; sent inline on the other).
Reports p50 / p99 / max per path and the ratio of the medians. Stopped server: every call of the
hook (each returns "ask again later", then a miss) against the step budget, and what the inline
path pays once: the client timeout.

    python perf/sweep_scheduler_calls.py --preset quick     # ~1 minute

Writes perf/results/cpu/sweep_scheduler_calls_<preset>.csv and .png.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import load_average, progress, quantile, results_dir, run_header, run_info, write_csv  # noqa: E402

from gpukv.frontend.client import CacheClient  # noqa: E402
from gpukv.frontend.process import ServerProcess  # noqa: E402
from gpukv.integrations.vllm.calls import ServerCalls  # noqa: E402
from gpukv.integrations.vllm.guard import GuardedClient  # noqa: E402
from gpukv.integrations.vllm.plan import RequestInfo, StepView  # noqa: E402
from gpukv.integrations.vllm.planner import SchedulerPlanner  # noqa: E402

PRESETS = {"quick": dict(repeats=10, calls=50), "full": dict(repeats=30, calls=100)}
CHUNK, TOKENS, MODEL, GROUP = 256, 2048, "sweep-model", "sweep-engine-group-0001"


def _planner(address: str, calls: ServerCalls, timeout_s: float = 10.0) -> SchedulerPlanner:
    client = GuardedClient(CacheClient(address, group=GROUP, timeout_s=timeout_s, ping_interval_s=0))
    return SchedulerPlanner(client, MODEL, tp_size=1, chunk_size=CHUNK, block_size=16, loadable=True,
                            calls=calls, lookup_wait_s=0.5)


def _hook(planner: SchedulerPlanner, prompt: list[int], n: int, tag: str) -> list[float]:
    """``n`` first lookups of fresh requests: seconds of each hook call."""
    out = []
    for i in range(n):
        info = RequestInfo(f"{tag}-{time.monotonic_ns()}-{i}", prompt)
        t0 = time.perf_counter()
        planner.num_new_matched_tokens(info, 0)
        out.append(time.perf_counter() - t0)
        planner.after_alloc(info.request_id, 0)
        planner.finished(info.request_id)
        planner.build(StepView([]))
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"{r['case']}\n{r['path']}" for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["p50_us"] / 1e3 for r in rows], width=0.4, label="p50")
    ax.bar([i + 0.2 for i in x], [r["max_us"] / 1e3 for r in rows], width=0.4, label="max")
    ax.set_xticks(list(x), labels)
    ax.set_yscale("log")
    ax.set_ylabel("ms per lookup hook call")
    ax.set_title("vLLM scheduler's lookup hook: calls thread vs inline RPC")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=PRESETS, default="quick")
    args = parser.parse_args()
    cfg = PRESETS[args.preset]
    torch.set_num_threads(1)
    info = run_info()
    print(run_header(info))
    prompt = list(range(1, TOKENS + 1))
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpukv-sweep-calls-") as tmp:
        address = f"ipc://{tmp}/gpukv.sock"
        with ServerProcess(address, chunk_size=CHUNK, capacity_bytes=64 << 20) as server:
            worker = CacheClient(address, group=GROUP, ping_interval_s=0)
            pages = torch.zeros(TOKENS // 16 + 1, 16, 16, dtype=torch.bfloat16)
            worker.register("w0", MODEL, [pages], "NB,BS,D", kind="mla")
            assert worker.store("w0", prompt, torch.arange(TOKENS)) == TOKENS
            paths = {"calls-thread": _planner(address, ServerCalls(0.02)),
                     "inline": _planner(address, ServerCalls(0.0, inline=True))}
            times = {name: [] for name in paths}
            for r in progress(range(cfg["repeats"]), desc="healthy"):
                for name in (paths if r % 2 == 0 else reversed(list(paths))):
                    times[name] += _hook(paths[name], prompt, cfg["calls"], name)
            assert paths["inline"].num_new_matched_tokens(RequestInfo("check", prompt), 0) == TOKENS - 1
            for name, ts in times.items():
                rows.append(dict(case="healthy", path=name, n=len(ts), p50_us=statistics.median(ts) * 1e6,
                                 p99_us=quantile(ts, 0.99) * 1e6, max_us=max(ts) * 1e6))
            ratio = rows[0]["p50_us"] / rows[1]["p50_us"]
            stopped = _planner(address, ServerCalls(0.02), timeout_s=2.0)
            inline = _planner(address, ServerCalls(0.0, inline=True), timeout_s=2.0)
            os.kill(server.pid, signal.SIGSTOP)
            try:
                info_ = RequestInfo("stopped", prompt)
                ts, answers = [], []
                while not answers or answers[-1] is None:
                    t0 = time.perf_counter()
                    answers.append(stopped.num_new_matched_tokens(info_, 0))
                    ts.append(time.perf_counter() - t0)
                    stopped.build(StepView([]))
                rows.append(dict(case="stopped", path="calls-thread", n=len(ts), p50_us=statistics.median(ts) * 1e6,
                                 p99_us=quantile(ts, 0.99) * 1e6, max_us=max(ts) * 1e6))
                t0 = time.perf_counter()
                inline.num_new_matched_tokens(RequestInfo("stopped-inline", prompt), 0)
                t_inline = time.perf_counter() - t0
                rows.append(dict(case="stopped", path="inline", n=1, p50_us=t_inline * 1e6,
                                 p99_us=t_inline * 1e6, max_us=t_inline * 1e6))
            finally:
                os.kill(server.pid, signal.SIGCONT)
            for planner in (*paths.values(), stopped, inline):
                planner.close()
            worker.close()
    print(f"\n{'case':8} {'path':13} {'n':>5} {'p50 us':>10} {'p99 us':>10} {'max us':>11}")
    for r in rows:
        print(f"{r['case']:8} {r['path']:13} {r['n']:>5} {r['p50_us']:>10.0f} {r['p99_us']:>10.0f} {r['max_us']:>11.0f}")
    print(f"\nhealthy: calls thread / inline p50 = {ratio:.2f}; stopped server: the hook's slowest "
          f"call {rows[2]['max_us'] / 1e3:.1f} ms ({rows[2]['n']} calls until the miss) vs the inline "
          f"path's {rows[3]['max_us'] / 1e3:.0f} ms (the client timeout); load now {load_average()}")
    out = results_dir("cpu") / f"sweep_scheduler_calls_{args.preset}.csv"
    write_csv(out, [dict(r, ratio_p50=ratio if r["case"] == "healthy" else "", **info) for r in rows])
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png').name}")


if __name__ == "__main__":
    main()
