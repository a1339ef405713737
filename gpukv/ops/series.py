"""The plain numbers behind the metrics: argument checks and a lock-free-inside histogram.

prometheus-client's ``Counter``/``Histogram`` children take a lock and a few Python calls per
update, several per LOOKUP; gpukv instead keeps plain ints, updated under the owner's one lock,
and turns them into metric families only when Prometheus scrapes (:mod:`gpukv.ops.metrics`; the
cost of both: perf/sweep_metrics.py).
"""

from __future__ import annotations

import bisect
import math
import numbers

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString


def check_count(name: str, value: object) -> None:
    """``value`` is an int >= 0 (``TypeError`` / ``ValueError`` naming ``name`` otherwise)."""
    if value.__class__ is int and value >= 0:  # the fast path: a plain non-negative int
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def check_seconds(name: str, value: object) -> None:
    """``value`` is a finite number of seconds >= 0."""
    if value.__class__ is float and 0.0 <= value < math.inf:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    if not 0.0 <= value < math.inf:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")


def check_label(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


class Histogram:
    """Bucket counts of observations (``le`` semantics: a value lands in the first bucket whose
    upper bound is >= it; past the last bound it lands in ``+Inf``). Not locked: its owner
    serialises :meth:`add` and :meth:`family`."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise ValueError(f"bucket bounds must be strictly increasing, got {bounds!r}")
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def bucket(self, value: float) -> int:
        """Index of the bucket ``value`` lands in (compute it before taking the lock)."""
        return bisect.bisect_left(self.bounds, value)

    def add(self, index: int, value: float) -> None:
        self.counts[index] += 1
        self.sum += value

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        """A ``HistogramMetricFamily`` of the current counts (cumulative, as exposed)."""
        cumulative, running = [], 0
        for bound, count in zip(self.bounds + (math.inf,), self.counts):
            running += count
            cumulative.append((floatToGoString(bound), running))
        return HistogramMetricFamily(name, doc, buckets=cumulative, sum_value=self.sum)


def counter_family(name: str, doc: str, label: str, counts: dict[str, int]) -> CounterMetricFamily:
    """A counter family with one sample per ``counts`` item, labelled ``label``."""
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, n in counts.items():
        family.add_metric([key], n)
    return family
