"""The HTTP admin endpoint of ``gpukv serve`` (``--http-port``): Prometheus metrics, health,
status and clear, built on :class:`gpukv.ops.admin_http.AdminServer`.

``/healthcheck`` answers 503 until the server is ready (its socket bound and its loop running),
200 after; ``/status`` is the document of :mod:`gpukv.ops.status`; ``POST /clear`` drops every
unlocked, unpinned L1 object (lower tiers keep theirs). Loopback only unless ``allow_remote``.
"""

from __future__ import annotations

import time
from typing import Callable

from gpukv.ops.admin_http import AdminServer
from gpukv.ops.status import (DeviceStatus, InstanceStatus, ModelStatus, Status,
                              TierStatus)


def status_document(core, *, clients: int, started: float) -> Status:
    """What ``GET /status`` shows of a cache (``core``: a :class:`gpukv.engine.core.CacheCore`)."""
    from gpukv import __version__

    l1 = core.l1.stats()
    devices = [DeviceStatus(name, d["capacity_bytes"], d["used_bytes"], d["objects"],
                            d["read_locked"]) for name, d in zip(core.devices, l1["devices"])]
    models = [ModelStatus(name, kind, [
        InstanceStatus(str(getattr(inst.instance_id, "ident", inst.instance_id))[:256] or "?",
                       inst.tp_rank, inst.tp_size, core.devices[inst.device])
        for inst in instances]) for name, kind, instances in core.registry.instances()]
    tiers = [TierStatus("L1", True, f"{len(core.devices)} arena(s)")]
    for tier in core.tiers:
        stats = tier.stats()
        healthy = bool(stats.get("connected", True))
        detail = str(getattr(tier, "root", "")) or getattr(tier, "url", "")
        tiers.append(TierStatus(tier.name, healthy, detail if healthy else f"down: {detail}"))
    return Status(__version__, max(0.0, time.monotonic() - started), core.config.chunk_size,
                  devices, models, clients, len(core.requests), tiers)


def start_admin(core, *, port: int, clients: Callable[[], int], host: str = "127.0.0.1",
                allow_remote: bool = False) -> AdminServer:
    """Bind and start the admin endpoint (not ready until ``set_ready()``)."""
    started = time.monotonic()
    metrics = core.observer.metrics
    if metrics is None:
        raise ValueError("--http-port needs metrics (EngineConfig.metrics=True)")
    metrics.set_snapshot(lambda: core.metrics_snapshot(clients=clients()))
    admin = AdminServer(metrics.render, host=host, port=port, allow_remote=allow_remote,
                        status=lambda: status_document(core, clients=clients(), started=started),
                        clear=core.l1.clear)
    return admin.start()
