"""Scrape-time gauges: a Prometheus collector that calls the owner's snapshot callable once per
scrape, so L1 occupancy, queue depths, clients and tier health cost nothing per request.

The snapshot is a plain dict (every count an ``int >= 0``; unknown keys are an error, so a typo
never silently exports nothing)::

    {
      "devices": {                      # required: one entry per L1 arena
        "cuda:0": {
          "used_bytes": int,            # bytes of the arena in allocated slots
          "capacity_bytes": int,        # the arena's byte budget
          "objects": int,               # objects present (writing, ready or read-locked)
          "read_locked_objects": int,   # objects with at least one reader share
          "shares_held": int,           # reader shares held, summed over objects
        },
      },
      "queues": {                       # optional; any subset of these names
        "spill": int,                   #   chunks waiting to be spilled out of L1
        "disk_writer": int,             #   chunks queued for the disk tier's writer
        "remote_writer": int,           #   chunks queued for the remote (Redis) tier's writer
      },
      "clients": int,                   # optional: connected client sessions (server only)
      "open_requests": int,             # optional: requests remembered (looked up, not ended)
      "tiers": {"L1": bool, "disk": bool, "remote": bool},   # optional; True = healthy
    }

Exported as ``gpukv_l1_used_bytes{device}``, ``gpukv_l1_capacity_bytes{device}``,
``gpukv_l1_objects{device}``, ``gpukv_l1_read_locked_objects{device}``,
``gpukv_l1_shares_held{device}``, ``gpukv_queue_depth{queue}``, ``gpukv_connected_clients``,
``gpukv_open_requests`` and ``gpukv_tier_up{tier}`` (1 healthy, 0 not). The callable runs on the
scraping thread (the HTTP admin's), so it must be thread-safe and quick (read counters; never
wait on a tier).
"""

from __future__ import annotations

import numbers
import threading
from typing import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

MAX_DEVICES = 64
DEVICE_FIELDS = {  # snapshot field -> (metric name, help)
    "used_bytes": ("gpukv_l1_used_bytes", "L1 bytes in allocated slots"),
    "capacity_bytes": ("gpukv_l1_capacity_bytes", "L1 byte budget"),
    "objects": ("gpukv_l1_objects", "L1 objects present"),
    "read_locked_objects": ("gpukv_l1_read_locked_objects", "L1 objects with a reader share"),
    "shares_held": ("gpukv_l1_shares_held", "Reader shares held on L1 objects"),
}
QUEUES = ("spill", "disk_writer", "remote_writer")
HEALTH_TIERS = ("L1", "disk", "remote")
TOP_KEYS = ("devices", "queues", "clients", "open_requests", "tiers")


def _gauge_count(where: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"snapshot {where} must be an int >= 0, got {value!r}")
    return int(value)


def _mapping(where: str, value: object) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"snapshot {where} must be a dict, got {type(value).__name__}")
    return value


def _families() -> dict[str, GaugeMetricFamily]:
    out = {name: GaugeMetricFamily(name, doc, labels=["device"])
           for name, doc in DEVICE_FIELDS.values()}
    out["gpukv_queue_depth"] = GaugeMetricFamily("gpukv_queue_depth", "Items waiting in a "
                                                 "background queue", labels=["queue"])
    out["gpukv_connected_clients"] = GaugeMetricFamily("gpukv_connected_clients",
                                                       "Connected client sessions")
    out["gpukv_open_requests"] = GaugeMetricFamily("gpukv_open_requests",
                                                   "Requests looked up and not yet ended")
    out["gpukv_tier_up"] = GaugeMetricFamily("gpukv_tier_up", "Tier health (1 healthy, 0 not)",
                                             labels=["tier"])
    return out


def snapshot_families(snapshot: dict) -> list[GaugeMetricFamily]:
    """The gauge families of one snapshot dict; ``ValueError`` naming the first bad entry."""
    snap = _mapping("document", snapshot)
    unknown = sorted(set(snap) - set(TOP_KEYS))
    if unknown:
        raise ValueError(f"snapshot has unknown keys {unknown}; allowed: {', '.join(TOP_KEYS)}")
    fam = _families()
    devices = _mapping("devices", snap.get("devices"))
    if len(devices) > MAX_DEVICES:
        raise ValueError(f"snapshot names {len(devices)} devices, more than {MAX_DEVICES}")
    for device, fields in devices.items():
        if not isinstance(device, str) or not device:
            raise ValueError(f"snapshot device names must be non-empty str, got {device!r}")
        fields = _mapping(f"devices[{device!r}]", fields)
        if set(fields) != set(DEVICE_FIELDS):
            raise ValueError(f"snapshot devices[{device!r}] must have exactly the keys "
                             f"{sorted(DEVICE_FIELDS)}, got {sorted(fields)}")
        for key, (name, _) in DEVICE_FIELDS.items():
            fam[name].add_metric([device], _gauge_count(f"devices[{device!r}][{key!r}]",
                                                        fields[key]))
    for queue, depth in _mapping("queues", snap.get("queues", {})).items():
        if queue not in QUEUES:
            raise ValueError(f"snapshot queue {queue!r} is not one of {', '.join(QUEUES)}")
        fam["gpukv_queue_depth"].add_metric([queue], _gauge_count(f"queues[{queue!r}]", depth))
    if "clients" in snap:
        fam["gpukv_connected_clients"].add_metric([], _gauge_count("clients", snap["clients"]))
    if "open_requests" in snap:
        fam["gpukv_open_requests"].add_metric([], _gauge_count("open_requests",
                                                               snap["open_requests"]))
    for tier, healthy in _mapping("tiers", snap.get("tiers", {})).items():
        if tier not in HEALTH_TIERS or not isinstance(healthy, bool):
            raise ValueError(f"snapshot tiers must map one of {', '.join(HEALTH_TIERS)} to a "
                             f"bool, got {tier!r}: {healthy!r}")
        fam["gpukv_tier_up"].add_metric([tier], 1 if healthy else 0)
    return [f for f in fam.values() if f.samples]


class SnapshotCollector(Collector):
    """Collector over a replaceable snapshot callable (``None``: no gauges)."""

    def __init__(self, source: Callable[[], dict] | None = None) -> None:
        self._lock = threading.Lock()
        self._source: Callable[[], dict] | None = None
        self.set_source(source)

    def set_source(self, source: Callable[[], dict] | None) -> None:
        if source is not None and not callable(source):
            raise TypeError(f"snapshot source must be callable or None, got {type(source).__name__}")
        with self._lock:
            self._source = source

    def describe(self) -> list[GaugeMetricFamily]:
        """The names this collector may export (checked by the registry for collisions)."""
        return list(_families().values())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            source = self._source
        if source is None:
            return iter(())
        return iter(snapshot_families(source()))
