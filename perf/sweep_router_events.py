"""What the router-grade events and per-tier hit sources cost on the hot paths, each against a
baseline measured in the same run, alternating A B / B A in every repeat:

- ``lookup``: LOOKUP of a 32-chunk prefix (8192 tokens, all hits) with ``tiers`` (the reply names
  each chunk's source) vs without, one ``gpukv serve`` over ipc://;
- ``store``: a worker's store of 4 new chunks (begin, pack, commit) into a server with
  ``--vllm-events`` (every commit feeds the translator) vs one without;
- ``scheduler``: the scheduler thread's part of the block descriptions for one prefill step of an
  8192-token request (slicing its new chunks' tokens and vLLM block hashes; the hashing and the
  round trip run on the describer's thread) vs the planner's ``build`` of the same step.

    python perf/sweep_router_events.py --preset quick      # ~1 minute

Writes perf/results/cpu/sweep_router_events_<preset>.csv.
"""

from __future__ import annotations

import argparse
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

PRESETS = {"quick": dict(repeats=10, calls=30), "full": dict(repeats=30, calls=60)}
CHUNK, BLOCK, TOKENS, MODEL = 256, 16, 8192, "sweep-model"


def _row(case: str, path: str, ts: list[float]) -> dict:
    return dict(case=case, path=path, n=len(ts), p50_us=statistics.median(ts) * 1e6,
                p99_us=quantile(ts, 0.99) * 1e6, max_us=max(ts) * 1e6)


def _lookups(client: CacheClient, prompt: list[int], n: int, tiers: bool) -> list[float]:
    hashes = client.copies.hashes(prompt)
    call = client.lookup_hashes_tiers if tiers else client.lookup_hashes
    out = []
    for i in range(n):
        rid = f"{tiers}-{time.monotonic_ns()}-{i}"
        t0 = time.perf_counter()
        call(MODEL, hashes, request_id=rid)
        out.append(time.perf_counter() - t0)
        client.end_session(rid)
    return out


def _stores(client: CacheClient, n: int, seed: list[int]) -> list[float]:
    out = []
    for _ in range(n):
        seed[0] += 1
        prompt = [seed[0]] + list(range(1, 4 * CHUNK))
        t0 = time.perf_counter()
        client.store("w0", prompt, torch.arange(4 * CHUNK))
        out.append(time.perf_counter() - t0)
    return out


def _scheduler(address: str, repeats: int, calls: int) -> list[dict]:
    from vllm import SamplingParams
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    from gpukv.integrations.vllm.block_meta import BlockDescriber
    from gpukv.integrations.vllm.guard import GuardedClient
    from gpukv.integrations.vllm.plan import ScheduledRequest, StepView
    from gpukv.integrations.vllm.planner import SchedulerPlanner
    from gpukv.integrations.vllm.translate import request_info

    fn = get_hash_fn_by_name("sha256")
    init_none_hash(fn)
    hasher = get_request_block_hasher(BLOCK, fn)
    client = GuardedClient(CacheClient(address, ping_interval_s=0))
    planner = SchedulerPlanner(client, MODEL, tp_size=1, chunk_size=CHUNK, block_size=BLOCK, load=False)
    describer = BlockDescriber(client, models=[MODEL], tp_size=1, block_size=BLOCK, chunk_size=CHUNK)
    blocks = list(range(TOKENS // BLOCK))
    times = {"build": [], "build+describe": []}
    for r in progress(range(repeats), desc="scheduler"):
        for path in (times if r % 2 == 0 else reversed(list(times))):
            for i in range(calls):
                rid = f"{path}-{r}-{i}"
                prompt = [r * 100_000 + i + 1] + list(range(2, TOKENS + 1))
                request = Request(rid, prompt, SamplingParams(max_tokens=1), None, block_hasher=hasher)
                planner.num_new_matched_tokens(request_info(request), 0)
                planner.after_alloc(rid, 0)
                describer.track(request)
                view = StepView([ScheduledRequest(rid, blocks, True, 0, TOKENS)])
                t0 = time.perf_counter()
                planner.build(view)
                if path == "build+describe":
                    describer.computed(rid, TOKENS)
                times[path].append(time.perf_counter() - t0)
                planner.finished(rid)
                describer.forget(rid)
                planner.build(StepView([], finished=frozenset([rid])))
    describer.close()
    planner.close()
    client.close()
    return [_row("scheduler", path, ts) for path, ts in times.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=PRESETS, default="quick")
    args = parser.parse_args()
    cfg = PRESETS[args.preset]
    torch.set_num_threads(1)
    info = run_info()
    print(run_header(info))
    prompt = list(range(1, TOKENS + 1))
    pages = torch.zeros(4 * CHUNK // 16 + TOKENS // 16 + 1, 16, 64, dtype=torch.bfloat16)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="gpukv-sweep-router-") as tmp:
        with ServerProcess(f"ipc://{tmp}/on.sock", chunk_size=CHUNK, capacity_bytes=256 << 20,
                           extra_args=["--vllm-events", f"ipc://{tmp}/vllm-events.sock"]) as on, \
                ServerProcess(f"ipc://{tmp}/off.sock", chunk_size=CHUNK, capacity_bytes=256 << 20) as off:
            clients = {}
            for name, server in (("router events on", on), ("router events off", off)):
                clients[name] = c = CacheClient(server.address, ping_interval_s=0)
                c.register("w0", MODEL, [pages], "NB,BS,D", kind="mla")
                assert c.store("w0", prompt, torch.arange(TOKENS)) == TOKENS
            lookups = {"tiers": [], "int": []}
            stores = {name: [] for name in clients}
            seed = [10_000]
            for r in progress(range(cfg["repeats"]), desc="lookup/store"):
                order = [True, False] if r % 2 == 0 else [False, True]
                for tiers in order:
                    lookups["tiers" if tiers else "int"] += _lookups(clients["router events off"], prompt,
                                                                     cfg["calls"], tiers)
                for name in (clients if r % 2 == 0 else reversed(list(clients))):
                    stores[name] += _stores(clients[name], cfg["calls"], seed)
            rows += [_row("lookup 32 chunks", path, ts) for path, ts in lookups.items()]
            rows += [_row("store 4 chunks", path, ts) for path, ts in stores.items()]
            for c in clients.values():
                c.close()
            rows += _scheduler(on.address, cfg["repeats"], cfg["calls"])
    print(f"\n{'case':17} {'path':18} {'n':>5} {'p50 us':>9} {'p99 us':>9} {'max us':>9}")
    for r in rows:
        print(f"{r['case']:17} {r['path']:18} {r['n']:>5} {r['p50_us']:>9.1f} {r['p99_us']:>9.1f} {r['max_us']:>9.1f}")
    for i in range(0, len(rows), 2):
        a, b = rows[i], rows[i + 1]
        ratio = a["p50_us"] / b["p50_us"]
        a["ratio_p50"] = b["ratio_p50"] = ratio
        print(f"{a['case']}: {a['path']} / {b['path']} p50 = {ratio:.3f} ({a['p50_us'] - b['p50_us']:+.1f} us)")
    print(f"load now {load_average()}")
    out = results_dir("cpu") / f"sweep_router_events_{args.preset}.csv"
    write_csv(out, [dict(r, **info) for r in rows])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
