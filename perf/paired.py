"""Arms against a baseline arm, repeat by repeat: a benchmark that runs its arms in turn, each
repeat on the same prompts (one dataset seed), compares each arm with the baseline run next to
it in time. On a shared machine whose speed drifts over a long run (other tenants, clock),
medians taken per arm over the repeats mix that drift into the comparison; the ratio within
each repeat does not. :func:`paired_ratios` gives, per arm and metric, the median, mean,
standard deviation, extremes and count of those ratios."""

from __future__ import annotations

import statistics


def paired_ratios(rows: list[dict], baseline: str, metrics: list[str], *, key: str = "seed") -> list[dict]:
    """One row per arm other than ``baseline`` and metric: ratios arm / baseline of the repeats
    (rows sharing ``key``) that ran both; values are read as floats (a CSV's strings too)."""
    by_repeat: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_repeat.setdefault(str(row[key]), {})[row["arm"]] = row
    arms = [a for a in dict.fromkeys(r["arm"] for r in rows) if a != baseline]
    out = []
    for arm in arms:
        for metric in metrics:
            ratios = [float(arms_[arm][metric]) / float(arms_[baseline][metric])
                      for arms_ in by_repeat.values()
                      if arm in arms_ and baseline in arms_ and float(arms_[baseline][metric])]
            if not ratios:
                continue
            out.append(dict(arm=arm, baseline=baseline, metric=metric, repeats=len(ratios),
                            median=statistics.median(ratios), mean=statistics.fmean(ratios),
                            sd=statistics.stdev(ratios) if len(ratios) > 1 else 0.0,
                            min=min(ratios), max=max(ratios)))
    return out
