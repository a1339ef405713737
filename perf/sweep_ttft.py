"""Time to first token of request B with and without gpukv, on a random-weight transformers model.

For each prompt length, request A (random tokens) is prefilled and stored once; request B shares
its first 50% / 90% of tokens. Per point: B's full prefill (the baseline, same run), B through
gpukv (lookup + retrieve + cache rebuild + suffix prefill; MLA: slowest of the TP ranks), and the
prefill of the hit prefix alone (the ideal saving). Reported: speedup = full / cached, and the
fraction of that ideal the cache round trip costs (gpukv = lookup + retrieve; total adds the
adapter's pages -> DynamicCache rebuild, which a paged-attention engine would not need).

Method: each serve times B's full prefill and then B through gpukv (the pair alternates, serve
after serve), the ideal (the hit prefix's prefill) right after each serve; torch threads fixed
(1 by default) and printed with the load average; min / median / max over the repeats kept.

    python perf/sweep_ttft.py --preset quick            # ~1 min on a 2-core CPU
    python perf/sweep_ttft.py --preset full --model tiny-deepseek
"""

from __future__ import annotations

import os

THREAD_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_NUM_THREADS": "1"}  # see sweep_kernels
for _k, _v in THREAD_ENV.items():
    os.environ.setdefault(_k, _v)

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import load_average, progress, results_dir, thread_settings, write_csv  # noqa: E402

from gpukv import CacheEngine, EngineConfig  # noqa: E402
from gpukv.integrations import transformers as adapter  # noqa: E402
from gpukv.testing.prefix_reuse import PrefixReuse, make_prompts  # noqa: E402

# model name -> (builder, TP ranks, config overrides per preset)
MODELS = {
    "tiny-llama": ("tiny_llama", 1, {
        "quick": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2),
        "full": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                     num_attention_heads=16, num_key_value_heads=4),
    }),
    "tiny-deepseek": ("tiny_deepseek", 2, {
        "quick": dict(hidden_size=512, intermediate_size=1408, moe_intermediate_size=352,
                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                      kv_lora_rank=256, q_lora_rank=384, qk_rope_head_dim=32, qk_nope_head_dim=32,
                      v_head_dim=32),
        "full": dict(hidden_size=1024, intermediate_size=2816, moe_intermediate_size=704,
                     num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16,
                     kv_lora_rank=512, q_lora_rank=768, qk_rope_head_dim=64, qk_nope_head_dim=64,
                     v_head_dim=64),
    }),
}
PRESETS = {
    "quick": dict(lengths=[512, 1024, 2048], shares=[0.5, 0.9], repeats=3),
    "full": dict(lengths=[1024, 2048, 4096, 8192], shares=[0.5, 0.9], repeats=3),
}
CHUNK_SIZE = 128
BLOCK_SIZE = 16


def _prefill_s(model, tokens: torch.Tensor) -> float:
    t0 = time.perf_counter()
    adapter.forward(model, tokens)
    return time.perf_counter() - t0


def sweep(model_name: str, preset: str, repeats: int | None = None) -> list[dict]:
    builder, tp_size, overrides = MODELS[model_name]
    cfg = PRESETS[preset]
    repeats = repeats or cfg["repeats"]
    model = getattr(adapter, builder)(0, **overrides[preset])
    spec = adapter.kv_spec(model)
    engine = CacheEngine(EngineConfig(capacity_bytes=1 << 30, device="cpu", chunk_size=CHUNK_SIZE))
    adapter.forward(model, torch.arange(64))  # warm-up
    rows = []
    points = [(n, s) for n in cfg["lengths"] for s in cfg["shares"]]
    with PrefixReuse(engine, model, model_name=model_name, max_tokens=max(cfg["lengths"]),
                     tp_size=tp_size, block_size=BLOCK_SIZE) as scenario:
        stored_for = None
        for num_tokens, share in progress(points, desc=f"ttft {model_name}"):
            shared = int(num_tokens * share)
            prompt_a, prompt_b = make_prompts(num_tokens, shared, seed=num_tokens)
            if stored_for != num_tokens:
                scenario.store(prompt_a)
                stored_for = num_tokens
            results, ideals = [], []
            for _ in range(repeats):
                results.append(scenario.serve(prompt_b, decode_tokens=0))
                ideals.append(_prefill_s(model, prompt_b[:results[0].hit_tokens]))
            hit = results[0].hit_tokens
            ideal = statistics.median(ideals)
            speedups = [r.ttft_full_s / r.ttft_cached_s for r in results]

            def med(fn):
                return statistics.median(fn(r) for r in results)

            slowest = [max(r.ranks, key=lambda x: x.retrieve_s + x.rebuild_s + x.suffix_s) for r in results]
            retrieve = statistics.median(s.retrieve_s for s in slowest)
            rebuild = statistics.median(s.rebuild_s for s in slowest)
            lookup = med(lambda r: r.lookup_s)
            full, cached = med(lambda r: r.ttft_full_s), med(lambda r: r.ttft_cached_s)
            rows.append(dict(
                model=model_name, kind=spec.kind, layers=spec.num_layers, tp_size=tp_size,
                prompt_tokens=num_tokens, shared_frac=share, shared_tokens=shared, hit_tokens=hit,
                ttft_full_ms=round(full * 1e3, 2), ttft_cached_ms=round(cached * 1e3, 2),
                speedup=round(full / cached, 3), speedup_min=round(min(speedups), 3),
                speedup_max=round(max(speedups), 3),
                ttft_full_min_ms=round(min(r.ttft_full_s for r in results) * 1e3, 2),
                ttft_full_max_ms=round(max(r.ttft_full_s for r in results) * 1e3, 2),
                ttft_cached_min_ms=round(min(r.ttft_cached_s for r in results) * 1e3, 2),
                ttft_cached_max_ms=round(max(r.ttft_cached_s for r in results) * 1e3, 2),
                prefix_prefill_ms=round(ideal * 1e3, 2),
                lookup_ms=round(lookup * 1e3, 3), retrieve_ms=round(retrieve * 1e3, 3),
                rebuild_ms=round(rebuild * 1e3, 3),
                suffix_ms=round(statistics.median(s.suffix_s for s in slowest) * 1e3, 2),
                gpukv_frac_of_ideal=round((lookup + retrieve) / ideal, 5),
                roundtrip_frac_of_ideal=round((lookup + retrieve + rebuild) / ideal, 5),
                logits_identical=all(r.logits_identical for r in results),
                max_abs_diff=max(r.max_abs_diff for r in results), repeats=repeats,
                threads=torch.get_num_threads(), loadavg_1m=load_average()[0],
            ))
    return rows


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(11, 4))
    lengths = sorted({r["prompt_tokens"] for r in rows})
    for model in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == model]
        for share in sorted({r["shared_frac"] for r in mine}):
            pts = [r for r in mine if r["shared_frac"] == share]
            x = [r["prompt_tokens"] for r in pts]
            label = f"{model} {share:.0%} shared"
            ax_t.plot(x, [r["ttft_cached_ms"] for r in pts], "o-", label=f"{label}, gpukv")
            ax_s.plot(x, [r["speedup"] for r in pts], "o-", label=label)
        base = [statistics.median(r["ttft_full_ms"] for r in mine if r["prompt_tokens"] == n)
                for n in lengths]
        ax_t.plot(lengths, base, "k--", label=f"{model}, no cache")
    ax_t.set(yscale="log", ylabel="TTFT (ms)", title="request B time to first token (CPU)")
    ax_s.set(ylabel="speedup (no cache / gpukv)", title="speedup")
    for ax in (ax_t, ax_s):
        ax.set(xscale="log", xlabel="prompt tokens")
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.minorticks_off()
        ax.legend(fontsize=7)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--model", choices=sorted(MODELS) + ["all"], default="tiny-llama")
    parser.add_argument("--repeats", type=int, default=None, help="serves per point (median)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (fixed for the run). On a CPU shared with other busy "
                             "processes, 1 avoids OpenMP stalls that inflate small copies 100x")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"thread settings: {thread_settings()}; load average before: {load_average()}")
    names = sorted(MODELS) if args.model == "all" else [args.model]
    rows = [row for name in names for row in sweep(name, args.preset, args.repeats)]
    cols = ["model", "prompt_tokens", "shared_tokens", "hit_tokens", "ttft_full_ms", "ttft_cached_ms",
            "speedup", "speedup_min", "speedup_max", "prefix_prefill_ms", "lookup_ms", "retrieve_ms", "rebuild_ms",
            "gpukv_frac_of_ideal", "roundtrip_frac_of_ideal", "logits_identical"]
    print(" ".join(f"{c:>14}" for c in cols))
    for r in rows:
        print(" ".join(f"{r[c]:>14}" for c in cols))
    print(f"thread settings: {thread_settings()}; load average after: {load_average()}")
    out = results_dir("cpu")
    stem = f"sweep_ttft_{args.model}_{args.preset}"
    print(f"csv: {write_csv(out / f'{stem}.csv', rows)}")
    print(f"png: {plot(rows, out / f'{stem}.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
