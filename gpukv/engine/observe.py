"""What one cache reports to operators: Prometheus metrics, KV events and their vLLM-format twin
for routers (see :mod:`gpukv.ops`).

``Observer`` sits beside the books: the core calls it on lookups, stores and retrieves (plain
counter additions), the L1 and the tiers call it when an object becomes readable or stops being
so (events), and the metrics' gauges and slow counters (evictions, lease expiries, deferred frees,
tier errors) are read from the L1's and tiers' own counters once per scrape, so the hot path pays
for none of them.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from gpukv.config import EngineConfig
from gpukv.constants import HASH_BYTES
from gpukv.engine.keys import parse_tier_key

log = logging.getLogger(__name__)

_TIER_STORED = {"written": "new", "restart": "restart"}


class Observer:
    """Metrics (``metrics``: a :class:`gpukv.ops.metrics.CacheMetrics`, or None when off) and
    events (``events``: a :class:`gpukv.ops.events.EventPublisher`, or None) of one cache."""

    def __init__(self, config: EngineConfig, space_of: Callable[[bytes], object],
                 ranks_of: Callable[[str, int], tuple[int, ...] | None] = lambda m, t: None) -> None:
        self.metrics = self.events = self.router = None
        if config.metrics:
            from gpukv import __version__
            from gpukv.ops.metrics import CacheMetrics

            self.metrics = CacheMetrics(version=__version__)
            for device in config.devices:
                self.metrics.add_device(device)
        if config.vllm_events_address is not None:  # router-grade events follow gpukv's own
            from gpukv.ops.router_events import RouterEvents

            self.router = RouterEvents(config.vllm_events_address, ranks_of=ranks_of,
                                       chunk_size=config.chunk_size, topic=config.vllm_events_topic,
                                       max_units=config.vllm_events_units)
        if config.events_address is not None or config.events_buffer or self.router is not None:
            from gpukv.ops.events import EventPublisher

            try:
                self.events = EventPublisher(config.events_address, buffer_size=config.events_buffer,
                                             listener=self.router.on_event if self.router else None)
            except BaseException:
                if self.router is not None:
                    self.router.close()
                raise
        self.devices = config.devices
        self._space_of = space_of
        self._seen: dict[str, int] = {}  # slow counters already exported, by name
        self._sync_lock = threading.Lock()

    # ---- events ------------------------------------------------------------------------------
    def l1_event(self, event: str, entry, reason: str) -> None:
        """The L1's callback (under its lock: it only enqueues)."""
        if self.events is None:
            return
        space = self._space_of(entry.key)
        if space is None:
            return
        chunk = [entry.key[:HASH_BYTES]]
        if event == "stored":
            self.events.stored("L1", space.model, space.kv_rank, chunk, reason)
        else:
            self.events.removed("L1", space.model, space.kv_rank, chunk, reason)

    def tier_event(self, tier: str) -> Callable[[str, str, str], None]:
        """The ``on_event(event, key, reason)`` callback of one tier."""
        def on_event(event: str, key: str, reason: str) -> None:
            parsed = parse_tier_key(key)
            if self.events is None or parsed is None:
                return
            model, _layout, kv_rank, chunk_hash = parsed
            if event == "stored":
                self.events.stored(tier, model, kv_rank, [chunk_hash], _TIER_STORED.get(reason, "new"))
            else:
                self.events.removed(tier, model, kv_rank, [chunk_hash], reason)
        return on_event

    # ---- per-request metrics -----------------------------------------------------------------
    def add_model(self, model: str) -> None:
        if self.metrics is not None:
            self.metrics.add_model(model)

    def lookup(self, model: str, requested_tokens: int, hits: dict[str, int], seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.lookup(model, requested_tokens, hits, seconds)

    def store(self, model: str, num_chunks: int, nbytes: int, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.store(model, num_chunks, nbytes, seconds)

    def retrieve(self, model: str, num_chunks: int, nbytes: int, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.retrieve(model, num_chunks, nbytes, seconds)

    def retrieve_failed(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.retrieve_failed(reason)

    # ---- scrape time ---------------------------------------------------------------------------
    def snapshot(self, l1_stats: dict, tier_stats: dict, *, spill_depth: int | None,
                 open_requests: int, clients: int | None = None) -> dict:
        """The gauges' snapshot (the schema of :mod:`gpukv.ops.snapshot`)."""
        devices = {name: dict(used_bytes=d["used_bytes"], capacity_bytes=d["capacity_bytes"],
                              objects=d["objects"], read_locked_objects=d["read_locked"],
                              shares_held=d["shares"])
                   for name, d in zip(self.devices, l1_stats["devices"])}
        out = dict(devices=devices, open_requests=open_requests,
                   tiers={"L1": True, **{name: bool(s.get("connected", True))
                                        for name, s in tier_stats.items()}})
        queues = {"disk_writer": tier_stats.get("disk", {}).get("queue_depth"),
                  "remote_writer": tier_stats.get("remote", {}).get("queue_depth"),
                  "spill": spill_depth}
        out["queues"] = {k: v for k, v in queues.items() if v is not None}
        if clients is not None:
            out["clients"] = clients
        return out

    def sync(self, l1_stats: dict, tier_stats: dict) -> None:
        """Move the slow counters' growth since the last scrape into the metrics."""
        if self.metrics is None:
            return
        m = self.metrics
        with self._sync_lock:
            for name, device in zip(self.devices, l1_stats["devices"]):
                self._grow(f"evictions/{name}", device["evictions"],
                           lambda n, name=name: m.evicted(name, n))
            self._grow("expired_shares", l1_stats["expired_shares"], lambda n: m.lease_expired("read", n))
            self._grow("expired_writes", l1_stats["expired_writes"], lambda n: m.lease_expired("write", n))
            self._grow("deferred_frees", l1_stats["deferred_frees"], m.pin_deferred_free)
            for name, stats in tier_stats.items():
                self._grow(f"tier_errors/{name}", stats.get("errors", 0),
                           lambda n, name=name: m.tier_error(name, n))

    def _grow(self, name: str, total: int, add: Callable[[int], None]) -> None:
        delta = total - self._seen.get(name, 0)
        if delta > 0:
            add(delta)
            self._seen[name] = total

    def close(self) -> None:
        if self.events is not None:
            self.events.close()
        if self.router is not None:
            self.router.close()
