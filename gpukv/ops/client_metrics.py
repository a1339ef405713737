"""Client-side round trips (:class:`ClientMetrics`), on a registry of their own: what a
:class:`gpukv.CacheClient` sees, server time plus transport, to compare with the server's
``gpukv_lookup_seconds``."""

from __future__ import annotations

import threading
from typing import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from gpukv.ops.metrics import LOOKUP_BUCKETS, TRANSFER_BUCKETS
from gpukv.ops.series import Histogram, check_seconds

HISTOGRAMS = {  # request -> (metric name, help, buckets)
    "lookup": ("gpukv_client_lookup_seconds", "LOOKUP round trip seen by the client",
               LOOKUP_BUCKETS),
    "store": ("gpukv_client_store_seconds", "STORE round trip (reserve, pack, commit) seen by "
              "the client", TRANSFER_BUCKETS),
    "retrieve": ("gpukv_client_retrieve_seconds", "RETRIEVE round trip (pin, unpack, release) "
                 "seen by the client", TRANSFER_BUCKETS),
}


class ClientMetrics(Collector):
    """Client-side round trips (a :class:`gpukv.CacheClient`'s view, its own ``.registry``).
    Thread-safe; bad arguments raise and change nothing."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._histograms = {req: Histogram(buckets) for req, (_, _, buckets) in HISTOGRAMS.items()}
        self._unavailable = 0
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def _observe(self, request: str, seconds: float) -> None:
        check_seconds("seconds", seconds)
        histogram = self._histograms[request]
        bucket = histogram.bucket(seconds)
        with self._lock:
            histogram.add(bucket, seconds)

    def lookup(self, seconds: float) -> None:
        """One LOOKUP round trip of ``seconds``."""
        self._observe("lookup", seconds)

    def store(self, seconds: float) -> None:
        """One STORE round trip of ``seconds``."""
        self._observe("store", seconds)

    def retrieve(self, seconds: float) -> None:
        """One RETRIEVE round trip of ``seconds``."""
        self._observe("retrieve", seconds)

    def server_unavailable(self) -> None:
        """A request that found no server (the client gave up or reconnected)."""
        with self._lock:
            self._unavailable += 1

    def collect(self) -> Iterator:
        with self._lock:
            out = [self._histograms[req].family(name, doc)
                   for req, (name, doc, _) in HISTOGRAMS.items()]
            out.append(CounterMetricFamily("gpukv_client_server_unavailable",
                                           "Requests that found no server answering",
                                           value=self._unavailable))
        return iter(out)

    def render(self) -> bytes:
        """Prometheus text exposition of the client's metrics."""
        return generate_latest(self.registry)
