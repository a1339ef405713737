"""CacheMetrics / ClientMetrics: a scripted workload moves every metric by exactly what it says,
labels stay bounded, bad calls change nothing, gauges come from the snapshot at scrape time."""

from __future__ import annotations

import math
import threading

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpukv.ops.client_metrics import ClientMetrics
from gpukv.ops.metrics import (LOOKUP_BUCKETS, OTHER, REJECT_REASONS, RETRIEVE_FAILURE_REASONS,
                               TIERS, CacheMetrics)
from gpukv.ops.series import Histogram
from gpukv.ops.snapshot import MAX_DEVICES


def samples(metrics) -> dict[tuple[str, tuple], float]:
    """``{(sample name, sorted label items): value}`` of a render, ``*_created`` left out."""
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            if not s.name.endswith("_created"):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(metrics, name: str, **labels) -> float:
    return samples(metrics)[(name, tuple(sorted(labels.items())))]


def label_values(metrics, name: str, label: str) -> set[str]:
    return {dict(k[1])[label] for k in samples(metrics) if k[0] == name}


@pytest.fixture
def m() -> CacheMetrics:
    metrics = CacheMetrics(version="9.9.9")
    assert metrics.add_model("llama") == "llama"
    assert metrics.add_model("dsv3") == "dsv3"
    return metrics


def test_lookups_count_requests_tokens_and_hits_per_tier_exactly(m):
    # every tier's series exists at 0 before any lookup, so rate() works from the first scrape
    for tier in TIERS:
        assert value(m, "gpukv_lookup_hit_tokens_total", model="llama", tier=tier) == 0
    m.lookup("llama", 1024, {"L1": 512, "disk": 256}, 30e-6)      # 768 of 1024 found
    m.lookup("llama", 512, {}, 80e-6)                              # a miss
    m.lookup("dsv3", 2048, {"L1": 0, "remote": 2048}, 0.2)         # all from the remote tier
    m.lookup("llama", 256, {"L1": 256}, 2.0)                       # past the last bucket
    assert value(m, "gpukv_lookup_requests_total", model="llama") == 3
    assert value(m, "gpukv_lookup_requests_total", model="dsv3") == 1
    assert value(m, "gpukv_lookup_requested_tokens_total", model="llama") == 1024 + 512 + 256
    assert value(m, "gpukv_lookup_requested_tokens_total", model="dsv3") == 2048
    hits = {(model, tier): value(m, "gpukv_lookup_hit_tokens_total", model=model, tier=tier)
            for model in ("llama", "dsv3") for tier in TIERS}
    assert hits == {("llama", "L1"): 768, ("llama", "disk"): 256, ("llama", "remote"): 0,
                    ("dsv3", "L1"): 0, ("dsv3", "disk"): 0, ("dsv3", "remote"): 2048}
    assert value(m, "gpukv_lookup_seconds_count") == 4
    assert math.isclose(value(m, "gpukv_lookup_seconds_sum"), 30e-6 + 80e-6 + 0.2 + 2.0)
    buckets = {b: value(m, "gpukv_lookup_seconds_bucket", le=str(b)) for b in LOOKUP_BUCKETS}
    assert buckets[25e-6] == 0 and buckets[50e-6] == 1 and buckets[100e-6] == 2
    assert buckets[0.25] == 3 and buckets[1.0] == 3
    assert value(m, "gpukv_lookup_seconds_bucket", le="+Inf") == 4
    assert value(m, "gpukv_build_info", version="9.9.9") == 1


def test_model_label_is_capped_and_the_rest_folds_into_other():
    m = CacheMetrics(max_models=2)
    assert [m.add_model(x) for x in ("a", "b", "c", "a")] == ["a", "b", OTHER, "a"]
    assert m.add_model(OTHER) == OTHER and m.models == ("a", "b")
    m.lookup("c", 256, {"L1": 256}, 1e-4)          # over the cap
    m.lookup("never-added", 512, {}, 1e-4)         # not registered at all
    m.lookup("a", 256, {}, 1e-4)
    assert label_values(m, "gpukv_lookup_requests_total", "model") == {"a", "b", OTHER}
    assert value(m, "gpukv_lookup_requests_total", model=OTHER) == 2
    assert value(m, "gpukv_lookup_hit_tokens_total", model=OTHER, tier="L1") == 256
    assert value(m, "gpukv_lookup_requested_tokens_total", model="a") == 256


@pytest.mark.parametrize("args, exc", [
    (("llama", 256, {"L2": 256}, 1e-4), ValueError),        # unknown tier
    (("llama", 256, {"L1": 512}, 1e-4), ValueError),        # more hits than requested
    (("llama", 256, {"L1": 128, "disk": 256}, 1e-4), ValueError),
    (("llama", -1, {}, 1e-4), ValueError),
    (("llama", 256, {"L1": -1}, 1e-4), ValueError),
    (("llama", 256.0, {}, 1e-4), TypeError),
    (("llama", True, {}, 1e-4), TypeError),
    (("llama", 256, {"L1": 1.5}, 1e-4), TypeError),
    (("llama", 256, [("L1", 256)], 1e-4), TypeError),
    (("llama", 256, {}, float("nan")), ValueError),
    (("llama", 256, {}, -1e-3), ValueError),
    (("llama", 256, {}, float("inf")), ValueError),
    (("llama", 256, {}, "fast"), TypeError),
    ((b"llama", 256, {}, 1e-4), TypeError),
])
def test_a_bad_lookup_raises_and_changes_no_metric(m, args, exc):
    m.lookup("llama", 256, {"L1": 256}, 1e-4)
    before = samples(m)
    with pytest.raises(exc):
        m.lookup(*args)
    assert samples(m) == before


def test_store_and_retrieve_count_chunks_bytes_and_seconds(m):
    m.store("llama", 4, 4 << 20, 0.003)
    m.store("llama", 1, 1 << 20, 0.0005)
    m.retrieve("dsv3", 8, 9 << 20, 0.02)
    assert value(m, "gpukv_store_chunks_total", model="llama") == 5
    assert value(m, "gpukv_store_bytes_total", model="llama") == 5 << 20
    assert value(m, "gpukv_store_bytes_total", model="dsv3") == 0
    assert value(m, "gpukv_store_seconds_count") == 2
    assert math.isclose(value(m, "gpukv_store_seconds_sum"), 0.0035)
    assert value(m, "gpukv_retrieve_chunks_total", model="dsv3") == 8
    assert value(m, "gpukv_retrieve_bytes_total", model="dsv3") == 9 << 20
    assert value(m, "gpukv_retrieve_seconds_bucket", le="0.025") == 1
    assert value(m, "gpukv_retrieve_seconds_bucket", le="0.01") == 0
    before = samples(m)
    for bad in [("llama", -1, 0, 0.1), ("llama", 1, 2**20, -0.1), ("llama", 1, "1MB", 0.1)]:
        with pytest.raises((ValueError, TypeError)):
            m.store(*bad)
        with pytest.raises((ValueError, TypeError)):
            m.retrieve(*bad)
    assert samples(m) == before


def test_event_counters_move_by_exact_counts_with_bounded_labels(m):
    m.retrieve_failed("not_found")
    m.retrieve_failed("not_found")
    m.retrieve_failed("copy_error")
    m.evicted("cuda:0", 3)
    m.evicted("cuda:1")
    m.evicted("cuda:0", 2)
    m.lease_expired("read", 5)
    m.lease_expired("write")
    m.pin_deferred_free()
    m.pin_deferred_free(2)
    m.client_reaped()
    m.tier_error("remote", 4)
    m.tier_error("disk")
    m.rejected("busy")
    m.rejected("over_limit")
    m.rejected("busy")
    assert {r: value(m, "gpukv_retrieve_failures_total", reason=r)
            for r in RETRIEVE_FAILURE_REASONS} == {"not_found": 2, "not_ready": 0, "wrong_state": 0,
                                                    "unknown_request": 0, "copy_error": 1,
                                                    "hole": 0}
    assert value(m, "gpukv_evictions_total", device="cuda:0") == 5
    assert value(m, "gpukv_evictions_total", device="cuda:1") == 1
    assert value(m, "gpukv_lease_expiries_total", kind="read") == 5
    assert value(m, "gpukv_lease_expiries_total", kind="write") == 1
    assert value(m, "gpukv_pin_deferred_frees_total") == 3
    assert value(m, "gpukv_reaped_clients_total") == 1
    assert value(m, "gpukv_tier_errors_total", tier="remote") == 4
    assert value(m, "gpukv_tier_errors_total", tier="disk") == 1
    assert value(m, "gpukv_tier_errors_total", tier="L1") == 0
    assert {r: value(m, "gpukv_rejected_requests_total", reason=r)
            for r in REJECT_REASONS} == {"busy": 2, "over_limit": 1}
    before = samples(m)
    bad_calls = [lambda: m.retrieve_failed("req-1234"), lambda: m.evicted("", 1),
                 lambda: m.evicted("cuda:0", -1), lambda: m.lease_expired("forever"),
                 lambda: m.tier_error("L2"), lambda: m.rejected("tired"),
                 lambda: m.client_reaped(1.0), lambda: m.pin_deferred_free(-2)]
    for call in bad_calls:
        with pytest.raises((ValueError, TypeError)):
            call()
    assert samples(m) == before


def test_a_value_on_a_bucket_bound_lands_in_that_bucket():
    m = CacheMetrics()
    m.lookup("x", 0, {}, 1e-4)      # exactly le="0.0001"
    m.lookup("x", 0, {}, 0.0)       # the first bucket
    m.lookup("x", 0, {}, 1e-4 + 1e-12)
    assert value(m, "gpukv_lookup_seconds_bucket", le="2.5e-05") == 1
    assert value(m, "gpukv_lookup_seconds_bucket", le="5e-05") == 1
    assert value(m, "gpukv_lookup_seconds_bucket", le="0.0001") == 2
    assert value(m, "gpukv_lookup_seconds_bucket", le="0.00025") == 3
    with pytest.raises(ValueError, match="increasing"):
        Histogram((1.0, 0.5))
    with pytest.raises(ValueError, match="increasing"):
        Histogram(())


def test_a_device_added_before_any_eviction_exports_zero():
    m = CacheMetrics()
    m.add_device("cuda:0")
    m.add_device("cuda:0")
    assert value(m, "gpukv_evictions_total", device="cuda:0") == 0
    m.evicted("cuda:0", 2)
    assert value(m, "gpukv_evictions_total", device="cuda:0") == 2
    with pytest.raises(ValueError):
        m.add_device("")


def test_eviction_devices_past_the_cap_fold_into_other():
    m = CacheMetrics()
    for i in range(MAX_DEVICES + 5):
        m.evicted(f"cuda:{i}")
    devices = label_values(m, "gpukv_evictions_total", "device")
    assert len(devices) == MAX_DEVICES + 1 and OTHER in devices
    assert value(m, "gpukv_evictions_total", device=OTHER) == 5


def test_each_instance_has_its_own_registry_and_the_default_one_stays_clean():
    a, b = CacheMetrics(), CacheMetrics()
    a.lookup("x", 256, {"L1": 256}, 1e-4)
    assert value(a, "gpukv_lookup_requests_total", model=OTHER) == 1
    assert value(b, "gpukv_lookup_requests_total", model=OTHER) == 0
    default = prometheus_client.generate_latest(prometheus_client.REGISTRY).decode()
    assert "gpukv_" not in default


def test_concurrent_lookups_lose_no_count():
    m = CacheMetrics()
    m.add_model("llama")
    threads, per_thread = 4, 2000
    start = threading.Barrier(threads)

    def work(i: int) -> None:
        start.wait()
        for _ in range(per_thread):
            m.lookup("llama", 512, {"L1": 256, "disk": i}, 1e-5)

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert value(m, "gpukv_lookup_requests_total", model="llama") == threads * per_thread
    assert value(m, "gpukv_lookup_hit_tokens_total", model="llama", tier="L1") == \
        threads * per_thread * 256
    assert value(m, "gpukv_lookup_hit_tokens_total", model="llama", tier="disk") == \
        per_thread * sum(range(threads))
    assert value(m, "gpukv_lookup_seconds_count") == threads * per_thread


def test_every_name_follows_the_conventions(m):
    m.set_snapshot(lambda: {"devices": {}})
    for family in text_string_to_metric_families(m.render().decode()):
        assert family.name.startswith("gpukv_")
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples)
        for s in family.samples:
            assert set(s.labels) <= {"model", "tier", "reason", "device", "kind", "queue", "le",
                                     "version"}


def test_client_metrics_observe_round_trips_on_their_own_registry():
    c = ClientMetrics()
    c.lookup(40e-6)
    c.lookup(3e-3)
    c.store(0.05)
    c.retrieve(0.02)
    c.retrieve(0.5)
    c.server_unavailable()
    assert value(c, "gpukv_client_lookup_seconds_count") == 2
    assert value(c, "gpukv_client_lookup_seconds_bucket", le="5e-05") == 1
    assert value(c, "gpukv_client_store_seconds_count") == 1
    assert value(c, "gpukv_client_retrieve_seconds_count") == 2
    assert value(c, "gpukv_client_server_unavailable_total") == 1
    before = samples(c)
    for bad in (-1.0, float("nan"), "1s", True):
        with pytest.raises((ValueError, TypeError)):
            c.lookup(bad)
    assert samples(c) == before
    assert not any(k[0].startswith("gpukv_lookup") for k in samples(c))
