"""Scrape-time gauges: read from the snapshot callable once per scrape, exactly its values, and a
snapshot that breaks the documented schema is refused by name."""

from __future__ import annotations

import pytest

from gpukv.ops.metrics import CacheMetrics
from test_ops_metrics import samples, value


def device(used=0, capacity=1 << 30, objects=0, locked=0, shares=0) -> dict:
    return dict(used_bytes=used, capacity_bytes=capacity, objects=objects,
                read_locked_objects=locked, shares_held=shares)


def test_gauges_are_read_once_per_scrape_from_the_latest_snapshot():
    m = CacheMetrics()
    calls = []
    state = {"objects": 3}

    def snapshot() -> dict:
        calls.append(1)
        return {"devices": {"cuda:0": device(used=3 << 20, objects=state["objects"], locked=1,
                                             shares=2),
                            "cuda:1": device(capacity=2 << 30)},
                "queues": {"spill": 7, "disk_writer": 2, "remote_writer": 0},
                "clients": 4, "open_requests": 9,
                "tiers": {"L1": True, "disk": True, "remote": False}}

    assert not any(k[0].startswith("gpukv_l1_") for k in samples(m))  # no source: no gauges
    m.set_snapshot(snapshot)
    for _ in range(100):
        m.lookup("x", 256, {"L1": 256}, 1e-4)
    assert calls == []                                   # nothing paid per request
    assert value(m, "gpukv_l1_used_bytes", device="cuda:0") == 3 << 20
    assert len(calls) == 1
    s = samples(m)
    assert s[("gpukv_l1_capacity_bytes", (("device", "cuda:1"),))] == 2 << 30
    assert s[("gpukv_l1_objects", (("device", "cuda:0"),))] == 3
    assert s[("gpukv_l1_read_locked_objects", (("device", "cuda:0"),))] == 1
    assert s[("gpukv_l1_shares_held", (("device", "cuda:0"),))] == 2
    assert {q: s[("gpukv_queue_depth", (("queue", q),))] for q in
            ("spill", "disk_writer", "remote_writer")} == {"spill": 7, "disk_writer": 2,
                                                           "remote_writer": 0}
    assert s[("gpukv_connected_clients", ())] == 4
    assert s[("gpukv_open_requests", ())] == 9
    assert {t: s[("gpukv_tier_up", (("tier", t),))] for t in ("L1", "disk", "remote")} == \
        {"L1": 1, "disk": 1, "remote": 0}
    state["objects"] = 11
    assert value(m, "gpukv_l1_objects", device="cuda:0") == 11
    m.set_snapshot(None)
    assert not any(k[0].startswith("gpukv_l1_") for k in samples(m))


def test_optional_sections_may_be_left_out():
    m = CacheMetrics()
    m.set_snapshot(lambda: {"devices": {"cpu": device(used=5)}})
    s = samples(m)
    assert s[("gpukv_l1_used_bytes", (("device", "cpu"),))] == 5
    assert not any(k[0] in ("gpukv_queue_depth", "gpukv_connected_clients", "gpukv_tier_up")
                   for k in s)


@pytest.mark.parametrize("snap, words", [
    ({}, "devices"),
    ({"devices": []}, "devices"),
    ({"devices": {"cpu": device()}, "typo": 1}, "typo"),
    ({"devices": {"cpu": {**device(), "extra": 1}}}, "extra"),
    ({"devices": {"cpu": {k: v for k, v in device().items() if k != "objects"}}}, "objects"),
    ({"devices": {"cpu": device(used=-1)}}, "used_bytes"),
    ({"devices": {"cpu": device(used=1.5)}}, "used_bytes"),
    ({"devices": {"cpu": device(used=True)}}, "used_bytes"),
    ({"devices": {"": device()}}, "device"),
    ({"devices": {f"cuda:{i}": device() for i in range(65)}}, "65 devices"),
    ({"devices": {}, "queues": {"req-17": 1}}, "req-17"),
    ({"devices": {}, "queues": {"spill": -3}}, "spill"),
    ({"devices": {}, "clients": "4"}, "clients"),
    ({"devices": {}, "tiers": {"L2": True}}, "L2"),
    ({"devices": {}, "tiers": {"disk": 1}}, "disk"),
    ([1, 2], "dict"),
])
def test_a_snapshot_that_breaks_the_schema_is_refused_by_name(snap, words):
    m = CacheMetrics()
    m.set_snapshot(lambda: snap)
    with pytest.raises(ValueError, match=words):
        m.render()


def test_set_snapshot_rejects_a_non_callable():
    m = CacheMetrics()
    with pytest.raises(TypeError, match="callable"):
        m.set_snapshot({"devices": {}})
