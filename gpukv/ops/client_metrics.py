"""Client-side round trips (:class:`ClientMetrics`), on a registry of their own: what a
:class:`gpukv.CacheClient` sees, server time plus transport, to compare with the server's
``gpukv_lookup_seconds``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from gpukv.ops.metrics import LOOKUP_BUCKETS, TRANSFER_BUCKETS, check_seconds


class ClientMetrics:
    """Client-side round trips (a :class:`gpukv.CacheClient`'s view, its own registry)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._lookup = Histogram("gpukv_client_lookup_seconds", "LOOKUP round trip seen by the "
                                 "client", buckets=LOOKUP_BUCKETS, registry=r)
        self._store = Histogram("gpukv_client_store_seconds", "STORE round trip (reserve, pack, "
                                "commit) seen by the client", buckets=TRANSFER_BUCKETS, registry=r)
        self._retrieve = Histogram("gpukv_client_retrieve_seconds", "RETRIEVE round trip (pin, "
                                   "unpack, release) seen by the client", buckets=TRANSFER_BUCKETS,
                                   registry=r)
        self._unavailable = Counter("gpukv_client_server_unavailable",
                                    "Requests that found no server answering", registry=r)

    def lookup(self, seconds: float) -> None:
        """One LOOKUP round trip of ``seconds``."""
        check_seconds("seconds", seconds)
        self._lookup.observe(seconds)

    def store(self, seconds: float) -> None:
        check_seconds("seconds", seconds)
        self._store.observe(seconds)

    def retrieve(self, seconds: float) -> None:
        check_seconds("seconds", seconds)
        self._retrieve.observe(seconds)

    def server_unavailable(self) -> None:
        """A request that found no server (the client gave up or reconnected)."""
        self._unavailable.inc()

    def render(self) -> bytes:
        """Prometheus text exposition of the client's metrics."""
        return generate_latest(self.registry)
