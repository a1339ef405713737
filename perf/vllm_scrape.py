"""The numbers the vLLM benchmark reads from an OpenAI server's ``/metrics`` (Prometheus text).

- vLLM's prefix cache counters (``COUNTERS``: queries and hits, its own and external);
- engine steps (``vllm:iteration_tokens_total``, a histogram of tokens per step): how many steps
  ran, how many were decode-only with one or with two running requests (the benchmark runs two
  at a time; a bucket bound of 1 and the next one, 8, split them) and the mean batch of those;
- per-request phases (histograms): mean queue, prefill and decode seconds
  (``vllm:request_{queue,prefill,decode}_time_seconds``).

Every value is summed over label sets (one engine, one model); :func:`engine_numbers` counts
what happened between two pages (the warm-up request before the benchmark is nobody's arm).
"""

from __future__ import annotations

COUNTERS = ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
            "vllm:external_prefix_cache_queries_total", "vllm:external_prefix_cache_hits_total")
PHASES = ("queue", "prefill", "decode")


def parse(text: str) -> dict[str, float]:
    """``{name or name{le="x"}: value}``: samples summed over every label but ``le`` (read with
    prometheus_client's parser, as :func:`gpukv.testing.vllm_api.sample` does)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            le = sample.labels.get("le")
            key = sample.name if le is None else f'{sample.name}{{le="{le}"}}'
            out[key] = out.get(key, 0.0) + sample.value
    return out


def engine_numbers(after: str, before: str = "") -> dict[str, float]:
    """The module docstring's numbers between two ``/metrics`` pages (``before`` empty: since
    the server started)."""
    old = parse(before)
    m = {key: value - old.get(key, 0.0) for key, value in parse(after).items()}
    got = {name: m.get(name, 0.0) for name in COUNTERS}
    steps = m.get("vllm:iteration_tokens_total_count", 0.0)
    one = m.get('vllm:iteration_tokens_total_bucket{le="1.0"}', 0.0)
    upto8 = m.get('vllm:iteration_tokens_total_bucket{le="8.0"}', 0.0)
    decode_steps = upto8
    out = dict(prefix_hit_rate=got[COUNTERS[1]] / max(got[COUNTERS[0]], 1),
               external_hit_tokens=got[COUNTERS[3]],
               external_hit_rate=got[COUNTERS[3]] / max(got[COUNTERS[2]], 1),
               steps=steps, decode_steps_1=one, decode_steps_2plus=upto8 - one,
               decode_batch_mean=(one + 2 * (upto8 - one)) / decode_steps if decode_steps else 0.0)
    for phase in PHASES:
        name = f"vllm:request_{phase}_time_seconds"
        count = m.get(f"{name}_count", 0.0)
        out[f"{phase}_mean_ms"] = 1e3 * m.get(f"{name}_sum", 0.0) / count if count else 0.0
    return out
