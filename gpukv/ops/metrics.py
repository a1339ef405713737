"""Prometheus metrics of one engine or server instance (:class:`CacheMetrics`) on its own
``CollectorRegistry``: no global state, never the default registry, so two engines in one process
never mix their counts (the client's round trips: :mod:`gpukv.ops.client_metrics`).

Hot path: a call checks its arguments, takes the instance's one lock and adds to plain ints
(:mod:`gpukv.ops.series`; cost: perf/sweep_metrics.py); metric families are built only when
Prometheus scrapes. Gauges (L1 occupancy, queue depths, clients, tier health) are read at
scrape time from a snapshot callable (:mod:`gpukv.ops.snapshot`): nothing per request.

Label sets are bounded: ``tier`` in :data:`TIERS`, ``reason`` / ``kind`` in the tuples below,
``model`` in the models passed to :meth:`CacheMetrics.add_model` (at most ``max_models``; any other
model is counted as ``"other"``), ``device`` in the devices seen (at most :data:`MAX_DEVICES`,
then ``"other"``). Never a request id or a hash. Every labelled series exists (at 0) from the
start, so ``rate()`` works from the first scrape.
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_left
from typing import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from gpukv.ops.series import Histogram, check_count, check_label, check_seconds, counter_family
from gpukv.ops.snapshot import MAX_DEVICES, SnapshotCollector

TIERS = ("L1", "disk", "remote")
RETRIEVE_FAILURE_REASONS = ("not_found", "not_ready", "wrong_state", "unknown_request",
                            "copy_error", "hole")
REJECT_REASONS = ("busy", "over_limit")
LEASE_KINDS = ("read", "write")
OTHER = "other"
DEFAULT_MAX_MODELS = 32
# server-side lookup: tens of microseconds (L1) to a few hundred milliseconds (a slow remote tier)
LOOKUP_BUCKETS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3,
                  100e-3, 250e-3, 1.0)
# store / retrieve of a prompt: a few chunks in microseconds to many MB in seconds
TRANSFER_BUCKETS = (100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3,
                    250e-3, 500e-3, 1.0, 2.5, 10.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST  # what GET /metrics answers with
MODEL_COUNTERS = {  # _ModelSeries field -> (metric name without _total, help)
    "requests": ("gpukv_lookup_requests", "LOOKUP requests"),
    "requested": ("gpukv_lookup_requested_tokens", "Prompt tokens asked for by lookups"),
    "store_bytes": ("gpukv_store_bytes", "Bytes stored into L1"),
    "store_chunks": ("gpukv_store_chunks", "Chunks stored into L1"),
    "retrieve_bytes": ("gpukv_retrieve_bytes", "Bytes retrieved out of L1"),
    "retrieve_chunks": ("gpukv_retrieve_chunks", "Chunks retrieved out of L1"),
}


class _ModelSeries:
    """One model's counts."""

    __slots__ = tuple(MODEL_COUNTERS) + ("hits",)

    def __init__(self) -> None:
        for field in MODEL_COUNTERS:
            setattr(self, field, 0)
        self.hits = dict.fromkeys(TIERS, 0)


class CacheMetrics(Collector):
    """Counters and histograms of one engine or server; its own registry (``.registry``).

    ``max_models`` bounds the ``model`` label; ``version`` is exported as
    ``gpukv_build_info{version}``. Thread-safe: every method may be called from any thread.
    Bad arguments raise ``ValueError`` / ``TypeError`` and change no metric.
    """

    def __init__(self, *, max_models: int = DEFAULT_MAX_MODELS, version: str | None = None) -> None:
        if isinstance(max_models, bool) or not isinstance(max_models, int) or max_models < 1:
            raise ValueError(f"max_models must be a positive int, got {max_models!r}")
        self.max_models = max_models
        self.version = None if version is None else str(version)
        self._lock = threading.Lock()
        self._models: dict[str, _ModelSeries] = {}
        self._other = _ModelSeries()
        self._lookup_seconds = Histogram(LOOKUP_BUCKETS)
        self._store_seconds = Histogram(TRANSFER_BUCKETS)
        self._retrieve_seconds = Histogram(TRANSFER_BUCKETS)
        self._failures = dict.fromkeys(RETRIEVE_FAILURE_REASONS, 0)
        self._evictions: dict[str, int] = {}
        self._expiries = dict.fromkeys(LEASE_KINDS, 0)
        self._pin_deferred = 0
        self._reaped = 0
        self._tier_errors = dict.fromkeys(TIERS, 0)
        self._rejected = dict.fromkeys(REJECT_REASONS, 0)
        self._snapshot = SnapshotCollector()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self.registry.register(self._snapshot)

    # ---- models ----------------------------------------------------------------------------
    def add_model(self, model: str) -> str:
        """Give ``model`` its own label (idempotent); returns the label its events count under:
        ``model``, or ``"other"`` once ``max_models`` models have one."""
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be a non-empty str, got {model!r}")
        with self._lock:
            if model in self._models:
                return model
            if model == OTHER or len(self._models) >= self.max_models:
                return OTHER
            self._models[model] = _ModelSeries()
            return model

    @property
    def models(self) -> tuple[str, ...]:
        """Models with their own label, in the order they were added."""
        return tuple(self._models)

    def _series(self, model: str) -> _ModelSeries:
        series = self._models.get(model)
        if series is not None:
            return series
        if not isinstance(model, str):
            raise TypeError(f"model must be a str, got {type(model).__name__}")
        return self._other

    # ---- events ----------------------------------------------------------------------------
    def lookup(self, model: str, requested_tokens: int, hit_tokens_by_tier: Mapping[str, int],
               seconds: float) -> None:
        """One LOOKUP: ``requested_tokens`` of the prompt, ``hit_tokens_by_tier[tier]`` prefix
        tokens found in each tier (tiers absent from the mapping found none; the hits sum to at
        most ``requested_tokens``), handled in ``seconds``."""
        series = self._series(model)
        if requested_tokens.__class__ is not int or requested_tokens < 0:  # fast path inlined
            check_count("requested_tokens", requested_tokens)
        if hit_tokens_by_tier.__class__ is not dict and not isinstance(hit_tokens_by_tier, Mapping):
            raise TypeError(f"hit_tokens_by_tier must be a mapping tier -> tokens, got "
                            f"{type(hit_tokens_by_tier).__name__}")
        hits = series.hits
        total = 0
        for tier, n in hit_tokens_by_tier.items():
            if tier not in hits:
                check_label("tier", tier, TIERS)
            if n.__class__ is not int or n < 0:  # format the name only for a bad value
                check_count(f"hit_tokens_by_tier[{tier!r}]", n)
            total += n
        if total > requested_tokens:
            raise ValueError(f"hit tokens {dict(hit_tokens_by_tier)} sum to {total} > "
                             f"requested_tokens {requested_tokens}")
        if seconds.__class__ is not float or not 0.0 <= seconds < math.inf:
            check_seconds("seconds", seconds)
        histogram = self._lookup_seconds
        bucket = bisect_left(histogram.bounds, seconds)
        with self._lock:
            series.requests += 1
            series.requested += requested_tokens
            for tier, n in hit_tokens_by_tier.items():
                hits[tier] += n
            histogram.counts[bucket] += 1
            histogram.sum += seconds

    def store(self, model: str, num_chunks: int, nbytes: int, seconds: float) -> None:
        """One committed STORE of ``num_chunks`` chunks (``nbytes`` in all) in ``seconds``."""
        self._transfer(model, num_chunks, nbytes, seconds, store=True)

    def retrieve(self, model: str, num_chunks: int, nbytes: int, seconds: float) -> None:
        """One successful RETRIEVE of ``num_chunks`` chunks (``nbytes``) in ``seconds``."""
        self._transfer(model, num_chunks, nbytes, seconds, store=False)

    def _transfer(self, model: str, num_chunks: int, nbytes: int, seconds: float, *,
                  store: bool) -> None:
        series = self._series(model)
        check_count("num_chunks", num_chunks)
        check_count("nbytes", nbytes)
        check_seconds("seconds", seconds)
        histogram = self._store_seconds if store else self._retrieve_seconds
        bucket = histogram.bucket(seconds)
        with self._lock:
            if store:
                series.store_chunks += num_chunks
                series.store_bytes += nbytes
            else:
                series.retrieve_chunks += num_chunks
                series.retrieve_bytes += nbytes
            histogram.add(bucket, seconds)

    def retrieve_failed(self, reason: str) -> None:
        """A RETRIEVE that wrote nothing; ``reason`` in :data:`RETRIEVE_FAILURE_REASONS`."""
        self._bump(self._failures, "reason", reason, RETRIEVE_FAILURE_REASONS, 1)

    def add_device(self, device: str) -> None:
        """Export ``device``'s eviction count (at 0) before its first eviction (idempotent)."""
        self.evicted(device, 0)

    def evicted(self, device: str, count: int = 1) -> None:
        """``count`` L1 objects evicted on ``device`` (e.g. ``"cuda:0"``); past
        :data:`MAX_DEVICES` devices the rest count under ``"other"``."""
        check_count("count", count)
        if not isinstance(device, str) or not device:
            raise ValueError(f"device must be a non-empty str, got {device!r}")
        with self._lock:
            if device not in self._evictions and len(self._evictions) >= MAX_DEVICES:
                device = OTHER
            self._evictions[device] = self._evictions.get(device, 0) + count

    def lease_expired(self, kind: str, count: int = 1) -> None:
        """``count`` leases of ``kind`` (``"read"``: shares released; ``"write"``: an unfinished
        write discarded) expired."""
        self._bump(self._expiries, "kind", kind, LEASE_KINDS, count)

    def pin_deferred_free(self, count: int = 1) -> None:
        """``count`` objects that had to be freed while a copy pinned them (freed at the last
        unpin instead)."""
        check_count("count", count)
        with self._lock:
            self._pin_deferred += count

    def client_reaped(self, count: int = 1) -> None:
        """``count`` clients reaped after they stopped pinging."""
        check_count("count", count)
        with self._lock:
            self._reaped += count

    def tier_error(self, tier: str, count: int = 1) -> None:
        """``count`` failed operations of ``tier`` (in :data:`TIERS`)."""
        self._bump(self._tier_errors, "tier", tier, TIERS, count)

    def rejected(self, reason: str) -> None:
        """A request answered busy or over a limit; ``reason`` in :data:`REJECT_REASONS`."""
        self._bump(self._rejected, "reason", reason, REJECT_REASONS, 1)

    def _bump(self, counts: dict[str, int], name: str, label: str, allowed: tuple[str, ...],
              count: int) -> None:
        check_count("count", count)
        if label not in counts:
            check_label(name, label, allowed)
        with self._lock:
            counts[label] += count

    # ---- exposition ------------------------------------------------------------------------
    def set_snapshot(self, snapshot: Callable[[], dict] | None) -> None:
        """Register the callable read at every scrape for the gauges (schema in
        :mod:`gpukv.ops.snapshot`); ``None`` exports no gauges."""
        self._snapshot.set_source(snapshot)

    def set_before_scrape(self, hook: Callable[[], None] | None) -> None:
        """Register a callable run at the start of every scrape, before the counters are read
        (the owner moves slow counters kept elsewhere, e.g. evictions, into this instance)."""
        self._before_scrape = hook

    def render(self) -> bytes:
        """Prometheus text exposition (format 0.0.4) of every metric; ``ValueError`` when the
        snapshot callable returns a document that breaks the schema."""
        return generate_latest(self.registry)

    def collect(self) -> Iterator:
        """The counter and histogram families (the registry calls this at each scrape)."""
        hook = getattr(self, "_before_scrape", None)
        if hook is not None:
            hook()
        with self._lock:
            out = self._families()
        return iter(out)

    def _families(self) -> list:
        models = dict(self._models)
        models[OTHER] = self._other
        out = [counter_family(name, doc, "model", {m: getattr(s, field) for m, s in models.items()})
               for field, (name, doc) in MODEL_COUNTERS.items()]
        hits = CounterMetricFamily("gpukv_lookup_hit_tokens", "Prefix tokens found by lookups, "
                                   "by the tier that held them", labels=["model", "tier"])
        for model, series in models.items():
            for tier, n in series.hits.items():
                hits.add_metric([model, tier], n)
        out += [hits,
                self._lookup_seconds.family("gpukv_lookup_seconds", "Server-side LOOKUP time"),
                self._store_seconds.family("gpukv_store_seconds", "STORE time (reserve to commit)"),
                self._retrieve_seconds.family("gpukv_retrieve_seconds",
                                              "RETRIEVE time (pin to release)"),
                counter_family("gpukv_retrieve_failures", "Retrieves that wrote nothing, by reason",
                         "reason", self._failures),
                counter_family("gpukv_evictions", "L1 objects evicted to make room", "device",
                         self._evictions),
                counter_family("gpukv_lease_expiries", "Leases that expired (read shares released, "
                         "unfinished writes discarded)", "kind", self._expiries),
                CounterMetricFamily("gpukv_pin_deferred_frees", "Objects that had to be freed "
                                    "while a copy pinned them, freed at the last unpin",
                                    value=self._pin_deferred),
                CounterMetricFamily("gpukv_reaped_clients", "Clients reaped after they stopped "
                                    "pinging", value=self._reaped),
                counter_family("gpukv_tier_errors", "Failed tier operations", "tier", self._tier_errors),
                counter_family("gpukv_rejected_requests", "Requests answered busy or over a limit",
                         "reason", self._rejected)]
        if self.version is not None:
            info = GaugeMetricFamily("gpukv_build_info", "gpukv build", labels=["version"])
            info.add_metric([self.version], 1)
            out.append(info)
        return out
