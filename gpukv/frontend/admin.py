"""The HTTP admin endpoint of ``gpukv serve`` (``--http-port``): Prometheus metrics, health,
status and clear, built on :class:`gpukv.ops.admin_http.AdminServer`.

``/healthcheck`` answers 503 until the server is ready (its socket bound and its loop running),
200 after, to anyone who reaches the port; ``/metrics``, ``/status`` (the document of
:mod:`gpukv.ops.status`) and ``POST /clear`` (drops every unlocked, unpinned L1 object; lower
tiers keep theirs) need the token of a 0600 file (``gpukv-admin.token`` in the runtime folder,
created at the first start, or ``--http-token-file``) as ``Authorization: Bearer <token>``:
Prometheus reads it with ``authorization: {credentials_file: <that file>}``. Loopback only
unless ``allow_remote``.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path
from typing import Callable

from gpukv.ops.admin_http import AdminServer
from gpukv.private_paths import open_private, runtime_dir
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


def admin_token(path: str | os.PathLike | None = None) -> tuple[str, Path]:
    """The endpoint's token and its file (default ``<runtime folder>/gpukv-admin.token``),
    created 0600 with a fresh random token when missing. ValueError for a file that is a link,
    another user's, or holds no token."""
    path = Path(path) if path is not None else runtime_dir(create=True) / "gpukv-admin.token"
    if not path.exists():
        try:
            fd = open_private(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except ValueError:
            if not path.exists():
                raise
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
    with os.fdopen(open_private(path, os.O_RDONLY)) as f:
        token = f.read(1024).strip()
    if len(token) < 16:
        raise ValueError(f"{path} holds no token (at least 16 characters)")
    return token, path


def start_admin(core, *, port: int, clients: Callable[[], int], host: str = "127.0.0.1",
                allow_remote: bool = False, token_file: str | None = None) -> AdminServer:
    """Bind and start the admin endpoint (not ready until ``set_ready()``); every route but
    /healthcheck needs the token of ``token_file`` (see :func:`admin_token`)."""
    started = time.monotonic()
    metrics = core.observer.metrics
    if metrics is None:
        raise ValueError("--http-port needs metrics (EngineConfig.metrics=True)")
    metrics.set_snapshot(lambda: core.metrics_snapshot(clients=clients()))
    token, path = admin_token(token_file)
    admin = AdminServer(metrics.render, host=host, port=port, allow_remote=allow_remote,
                        status=lambda: status_document(core, clients=clients(), started=started),
                        clear=core.l1.clear, token=token)
    admin.token_file = path
    return admin.start()
