"""What ``vllm bench serve``'s detailed result (``--save-detailed``) says about batch composition.

Its per-request ``start_times``, ``ttfts`` and ``itls`` give every token's arrival time on the
client. With 2 requests at a time, a request's inter-token gap is one engine step: a decode step
(both running requests emit a token), or a step that also ran another request's prefill (a
"stall": one such gap is several decode steps long). TPOT (vLLM's: (e2e - TTFT) / (outputs - 1),
per request, then the median) is then the decode gaps plus the stalls spread over the outputs;
this module splits it so:

- ``decode_gap_p50_ms``: the median gap that is not a stall (the decode step's time, as the
  client sees it);
- ``stalls_per_req``: how many gaps of a request were stalls (other requests' prefills that ran
  while it decoded); ``tpot_stall_ms``: their time beyond a decode gap, per output token, mean
  over requests; ``tpot_steady_ms``: the mean of the non-stall gaps (mean over requests);
- ``paired_starts``: the fraction of requests sent within ``pair_s`` of another one (the client
  sends the next request when one finishes: two requests that finish in the same step start
  together and their prefills run together, "lockstep"; spread out, each prefill runs beside
  the other request's decode).

A stall is a gap longer than ``stall_factor`` times the run's median gap (a prefill of the
benchmark's prompts takes many decode steps' time on a CPU).
"""

from __future__ import annotations

import statistics


def timeline_stats(result: dict, *, stall_factor: float = 2.5, pair_s: float = 0.02) -> dict[str, float]:
    """The module docstring's numbers from one detailed ``vllm bench serve`` result."""
    starts, ttfts, itls = result.get("start_times"), result.get("ttfts"), result.get("itls")
    if not (starts and ttfts and itls) or not len(starts) == len(ttfts) == len(itls):
        raise ValueError("the result has no per-request start_times/ttfts/itls (run with --save-detailed)")
    gaps = [g for request in itls for g in request]
    if not gaps:
        raise ValueError("no inter-token gaps in the result (one output token per request?)")
    median = statistics.median(gaps)
    limit = stall_factor * median
    steady, stall_time, stalls = [], [], []
    for request in itls:
        if not request:
            continue
        plain = [g for g in request if g <= limit]
        slow = [g for g in request if g > limit]
        typical = statistics.fmean(plain) if plain else median
        steady.append(typical)
        stall_time.append(sum(g - typical for g in slow) / len(request))
        stalls.append(len(slow))
    ordered = sorted(starts)
    paired = sum(1 for i, t in enumerate(ordered)
                 if (i > 0 and t - ordered[i - 1] <= pair_s) or (i + 1 < len(ordered) and ordered[i + 1] - t <= pair_s))
    return dict(decode_gap_p50_ms=1e3 * statistics.median([g for g in gaps if g <= limit]),
                tpot_steady_ms=1e3 * statistics.fmean(steady), tpot_stall_ms=1e3 * statistics.fmean(stall_time),
                stalls_per_req=statistics.fmean(stalls), paired_starts=paired / len(starts))
