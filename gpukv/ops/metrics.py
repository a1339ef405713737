"""Prometheus metrics of one engine or server instance (:class:`CacheMetrics`) on its own
``CollectorRegistry``: no global state, never the default registry, so two engines in one process
never mix their counts (the client's round trips: :mod:`gpukv.ops.client_metrics`).

Hot-path cost: every label child is bound once (per model at :meth:`CacheMetrics.add_model`, per
tier / reason at construction); a call is a dict lookup, a few validations and a few
``inc``/``observe`` calls, no string formatting. Gauges (L1 occupancy, queue depths, clients, tier
health) are read at scrape time from a snapshot callable (:mod:`gpukv.ops.snapshot`), so nothing
is paid for them per request.

Label sets are bounded: ``tier`` in :data:`TIERS`, ``reason`` in the tuples below, ``model`` in
the models passed to :meth:`CacheMetrics.add_model` (at most ``max_models``; any other model is
counted as ``"other"``), ``device`` in the devices seen (at most :data:`MAX_DEVICES`, then
``"other"``). Never a request id or a hash.
"""

from __future__ import annotations

import math
import numbers
import threading
from typing import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from gpukv.ops.snapshot import MAX_DEVICES, SnapshotCollector

TIERS = ("L1", "disk", "remote")
RETRIEVE_FAILURE_REASONS = ("not_found", "not_ready", "wrong_state", "unknown_request",
                            "copy_error")
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


def check_count(name: str, value: object) -> None:
    if value.__class__ is int and value >= 0:  # the fast path: a plain non-negative int
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def check_seconds(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    if not 0.0 <= value < math.inf:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")


def _label(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


class _ModelSeries:
    """The per-model children of every model-labelled metric, bound once."""

    __slots__ = ("requests", "requested", "hits", "store_bytes", "store_chunks",
                 "retrieve_bytes", "retrieve_chunks")

    def __init__(self, m: "CacheMetrics", model: str) -> None:
        self.requests = m._requests.labels(model)
        self.requested = m._requested.labels(model)
        self.hits = {tier: m._hits.labels(model, tier) for tier in TIERS}
        self.store_bytes = m._store_bytes.labels(model)
        self.store_chunks = m._store_chunks.labels(model)
        self.retrieve_bytes = m._retrieve_bytes.labels(model)
        self.retrieve_chunks = m._retrieve_chunks.labels(model)


class CacheMetrics:
    """Counters and histograms of one engine or server; its own registry (``.registry``).

    ``max_models`` bounds the ``model`` label; ``version`` is exported as
    ``gpukv_build_info{version}``. Thread-safe: every method may be called from any thread.
    Bad arguments raise ``ValueError`` / ``TypeError`` and change no metric.
    """

    def __init__(self, *, max_models: int = DEFAULT_MAX_MODELS, version: str | None = None) -> None:
        if isinstance(max_models, bool) or not isinstance(max_models, int) or max_models < 1:
            raise ValueError(f"max_models must be a positive int, got {max_models!r}")
        self.max_models = max_models
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._requests = Counter("gpukv_lookup_requests", "LOOKUP requests", ["model"], registry=r)
        self._requested = Counter("gpukv_lookup_requested_tokens",
                                  "Prompt tokens asked for by lookups", ["model"], registry=r)
        self._hits = Counter("gpukv_lookup_hit_tokens",
                             "Prefix tokens found by lookups, by the tier that held them",
                             ["model", "tier"], registry=r)
        self._lookup_seconds = Histogram("gpukv_lookup_seconds", "Server-side LOOKUP handling time",
                                         buckets=LOOKUP_BUCKETS, registry=r)
        self._store_bytes = Counter("gpukv_store_bytes", "Bytes stored into L1", ["model"],
                                    registry=r)
        self._store_chunks = Counter("gpukv_store_chunks", "Chunks stored into L1", ["model"],
                                     registry=r)
        self._store_seconds = Histogram("gpukv_store_seconds", "STORE time (reserve to commit)",
                                        buckets=TRANSFER_BUCKETS, registry=r)
        self._retrieve_bytes = Counter("gpukv_retrieve_bytes", "Bytes retrieved out of L1",
                                       ["model"], registry=r)
        self._retrieve_chunks = Counter("gpukv_retrieve_chunks", "Chunks retrieved out of L1",
                                        ["model"], registry=r)
        self._retrieve_seconds = Histogram("gpukv_retrieve_seconds", "RETRIEVE time (pin to release)",
                                           buckets=TRANSFER_BUCKETS, registry=r)
        failures = Counter("gpukv_retrieve_failures", "Retrieves that wrote nothing, by reason",
                           ["reason"], registry=r)
        self._failures = {reason: failures.labels(reason) for reason in RETRIEVE_FAILURE_REASONS}
        self._evictions = Counter("gpukv_evictions", "L1 objects evicted to make room", ["device"],
                                  registry=r)
        self._devices: dict[str, object] = {}
        expiries = Counter("gpukv_lease_expiries", "Leases that expired (read shares released, "
                           "unfinished writes discarded)", ["kind"], registry=r)
        self._expiries = {kind: expiries.labels(kind) for kind in LEASE_KINDS}
        self._pin_deferred = Counter("gpukv_pin_deferred_frees", "Objects that had to be freed "
                                     "while a copy pinned them, freed at the last unpin", registry=r)
        self._reaped = Counter("gpukv_reaped_clients", "Clients reaped after they stopped pinging",
                               registry=r)
        tier_errors = Counter("gpukv_tier_errors", "Failed tier operations", ["tier"], registry=r)
        self._tier_errors = {tier: tier_errors.labels(tier) for tier in TIERS}
        rejected = Counter("gpukv_rejected_requests", "Requests answered busy or over a limit",
                           ["reason"], registry=r)
        self._rejected = {reason: rejected.labels(reason) for reason in REJECT_REASONS}
        if version is not None:
            Info("gpukv_build", "gpukv build", registry=r).info({"version": str(version)})
        self._lock = threading.Lock()
        self._models: dict[str, _ModelSeries] = {}
        self._other = _ModelSeries(self, OTHER)
        self._snapshot = SnapshotCollector()
        r.register(self._snapshot)

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
            self._models[model] = _ModelSeries(self, model)
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
        check_count("requested_tokens", requested_tokens)
        if hit_tokens_by_tier.__class__ is not dict and not isinstance(hit_tokens_by_tier, Mapping):
            raise TypeError(f"hit_tokens_by_tier must be a mapping tier -> tokens, got "
                            f"{type(hit_tokens_by_tier).__name__}")
        total = 0
        for tier, n in hit_tokens_by_tier.items():
            if tier not in series.hits:
                _label("tier", tier, TIERS)
            if n.__class__ is not int or n < 0:  # format the name only for a bad value
                check_count(f"hit_tokens_by_tier[{tier!r}]", n)
            total += n
        if total > requested_tokens:
            raise ValueError(f"hit tokens {dict(hit_tokens_by_tier)} sum to {total} > "
                             f"requested_tokens {requested_tokens}")
        check_seconds("seconds", seconds)
        series.requests.inc()
        if requested_tokens:
            series.requested.inc(requested_tokens)
        for tier, n in hit_tokens_by_tier.items():
            if n:
                series.hits[tier].inc(n)
        self._lookup_seconds.observe(seconds)

    def store(self, model: str, num_chunks: int, nbytes: int, seconds: float) -> None:
        """One committed STORE of ``num_chunks`` chunks (``nbytes`` in all) in ``seconds``."""
        series = self._series(model)
        check_count("num_chunks", num_chunks)
        check_count("nbytes", nbytes)
        check_seconds("seconds", seconds)
        series.store_chunks.inc(num_chunks)
        series.store_bytes.inc(nbytes)
        self._store_seconds.observe(seconds)

    def retrieve(self, model: str, num_chunks: int, nbytes: int, seconds: float) -> None:
        """One successful RETRIEVE of ``num_chunks`` chunks (``nbytes``) in ``seconds``."""
        series = self._series(model)
        check_count("num_chunks", num_chunks)
        check_count("nbytes", nbytes)
        check_seconds("seconds", seconds)
        series.retrieve_chunks.inc(num_chunks)
        series.retrieve_bytes.inc(nbytes)
        self._retrieve_seconds.observe(seconds)

    def retrieve_failed(self, reason: str) -> None:
        """A RETRIEVE that wrote nothing; ``reason`` in :data:`RETRIEVE_FAILURE_REASONS`."""
        child = self._failures.get(reason)
        if child is None:
            _label("reason", reason, RETRIEVE_FAILURE_REASONS)
        child.inc()

    def evicted(self, device: str, count: int = 1) -> None:
        """``count`` L1 objects evicted on ``device`` (e.g. ``"cuda:0"``)."""
        check_count("count", count)
        child = self._devices.get(device)
        if child is None:
            if not isinstance(device, str) or not device:
                raise ValueError(f"device must be a non-empty str, got {device!r}")
            with self._lock:
                if device not in self._devices:
                    label = device if len(self._devices) < MAX_DEVICES else OTHER
                    self._devices[device] = self._evictions.labels(label)
                child = self._devices[device]
        child.inc(count)

    def lease_expired(self, kind: str, count: int = 1) -> None:
        """``count`` leases of ``kind`` (``"read"``: shares released; ``"write"``: an unfinished
        write discarded) expired."""
        check_count("count", count)
        child = self._expiries.get(kind)
        if child is None:
            _label("kind", kind, LEASE_KINDS)
        child.inc(count)

    def pin_deferred_free(self, count: int = 1) -> None:
        """``count`` objects that had to be freed while a copy pinned them (freed at the last
        unpin instead)."""
        check_count("count", count)
        self._pin_deferred.inc(count)

    def client_reaped(self, count: int = 1) -> None:
        """``count`` clients reaped after they stopped pinging."""
        check_count("count", count)
        self._reaped.inc(count)

    def tier_error(self, tier: str, count: int = 1) -> None:
        """``count`` failed operations of ``tier`` (in :data:`TIERS`)."""
        check_count("count", count)
        child = self._tier_errors.get(tier)
        if child is None:
            _label("tier", tier, TIERS)
        child.inc(count)

    def rejected(self, reason: str) -> None:
        """A request answered busy or over a limit; ``reason`` in :data:`REJECT_REASONS`."""
        child = self._rejected.get(reason)
        if child is None:
            _label("reason", reason, REJECT_REASONS)
        child.inc()

    # ---- exposition ------------------------------------------------------------------------
    def set_snapshot(self, snapshot: Callable[[], dict] | None) -> None:
        """Register the callable read at every scrape for the gauges (schema in
        :mod:`gpukv.ops.snapshot`); ``None`` exports no gauges."""
        self._snapshot.set_source(snapshot)

    def render(self) -> bytes:
        """Prometheus text exposition (format 0.0.4) of every metric; ``ValueError`` when the
        snapshot callable returns a document that breaks the schema."""
        return generate_latest(self.registry)

