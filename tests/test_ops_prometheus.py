"""A real Prometheus scrapes an AdminServer serving a CacheMetrics fed by a scripted workload,
and its HTTP API returns exactly the values the workload produced (the same fixture will point
at a real ``gpukv serve --http-port``)."""

from __future__ import annotations

import pytest

from gpukv.ops.admin_http import AdminServer
from gpukv.ops.metrics import CacheMetrics
from prometheus_server import prometheus_factory  # noqa: F401 - the fixture

pytestmark = pytest.mark.slow


def workload(m: CacheMetrics) -> None:
    m.add_model("llama")
    m.add_model("dsv3")
    for _ in range(3):
        m.lookup("llama", 1024, {"L1": 512, "disk": 256}, 1e-4)
    m.lookup("llama", 512, {}, 5e-5)
    m.lookup("dsv3", 4096, {"L1": 1024, "remote": 2048}, 3e-3)
    m.evicted("cpu", 5)
    m.client_reaped()


def test_prometheus_scrapes_exactly_the_hit_tokens_the_workload_produced(prometheus_factory):  # noqa: F811
    m = CacheMetrics(version="0.1.0")
    workload(m)
    m.set_snapshot(lambda: {"devices": {"cpu": dict(used_bytes=3 << 20, capacity_bytes=1 << 30,
                                                    objects=12, read_locked_objects=2,
                                                    shares_held=4)},
                            "tiers": {"L1": True, "disk": True, "remote": False}})
    with AdminServer(m.render) as admin:
        admin.set_ready()
        prom = prometheus_factory([admin.target])
        prom.poll_until(prom.targets_up, 30, "the gpukv target up")
        prom.wait_for("gpukv_lookup_hit_tokens_total", {
            (("instance", admin.target), ("job", "gpukv"), ("model", model), ("tier", tier)): v
            for (model, tier), v in {
                ("llama", "L1"): 1536, ("llama", "disk"): 768, ("llama", "remote"): 0,
                ("dsv3", "L1"): 1024, ("dsv3", "disk"): 0, ("dsv3", "remote"): 2048,
                ("other", "L1"): 0, ("other", "disk"): 0, ("other", "remote"): 0}.items()})
        # what an operator's dashboard asks: hit rate per tier, lookups, L1 pressure, health
        prom.wait_for('sum by (tier) (gpukv_lookup_hit_tokens_total{model="llama"}) / ignoring '
                      '(tier) group_left sum(gpukv_lookup_requested_tokens_total{model="llama"})',
                      {(("tier", "L1"),): 1536 / 3584, (("tier", "disk"),): 768 / 3584,
                       (("tier", "remote"),): 0.0})
        prom.wait_for('sum(gpukv_lookup_requests_total)', {(): 5})
        prom.wait_for('gpukv_lookup_seconds_count', {(("instance", admin.target),
                                                      ("job", "gpukv")): 5})
        prom.wait_for('gpukv_l1_used_bytes / gpukv_l1_capacity_bytes',
                      {(("device", "cpu"), ("instance", admin.target), ("job", "gpukv")):
                       (3 << 20) / (1 << 30)})
        prom.wait_for('gpukv_tier_up == 0', {(("instance", admin.target), ("job", "gpukv"),
                                              ("tier", "remote")): 0})
        prom.wait_for('sum(gpukv_evictions_total) + sum(gpukv_reaped_clients_total)', {(): 6})
        # more traffic: a later scrape carries it
        m.lookup("dsv3", 256, {"L1": 256}, 1e-4)
        prom.wait_for('gpukv_lookup_hit_tokens_total{model="dsv3",tier="L1"}',
                      {(("instance", admin.target), ("job", "gpukv"), ("model", "dsv3"),
                        ("tier", "L1")): 1280})
