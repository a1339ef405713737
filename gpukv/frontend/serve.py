"""``gpukv serve``'s entry point: the core (arenas, tiers, events) and the server from the command
line, the HTTP admin endpoint when asked for, then the loop until SIGTERM or SIGINT, after which
queued spills are flushed (``--flush-timeout``) and everything is released."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from gpukv.curve_keys import KEY_FILE_ENV
from gpukv.frontend import protocol as p
from gpukv.frontend.server import CacheServer, ServerConfig
from gpukv.frontend.session import Limits

log = logging.getLogger(__name__)


def serve_main(args: argparse.Namespace) -> int:
    """Entry point of ``gpukv serve`` (options from :func:`gpukv.cli.build_parser`)."""
    from gpukv.config import EngineConfig
    from gpukv.engine.core import CacheCore

    if args.key_file:  # the server's and the events' tcp:// sockets, and this process's clients
        os.environ[KEY_FILE_ENV] = os.path.abspath(args.key_file)
    limits = Limits(max_instances=args.max_instances, max_open_requests=args.max_open_requests,
                    max_plans=args.max_plans, max_reserved_bytes=args.max_reserved,
                    max_sessions=args.max_sessions,
                    max_sessions_per_process=args.max_sessions_per_process)
    config = ServerConfig(address=args.address or p.default_address(),
                          worker_timeout_s=args.worker_timeout, threads=args.threads,
                          allow_remote=args.allow_remote, allow_abstract=args.allow_abstract,
                          limits=limits, orphan_hold_s=args.orphan_hold)
    from gpukv.l1.topology import TorchGpus, server_devices

    requested = args.devices.split(",") if args.devices else [args.device] if args.device else None
    devices = tuple(server_devices(requested, TorchGpus()))  # default: every GPU it sees, else cpu
    log.info("gpukv serve: one arena of %d bytes on each of %s", args.capacity, ", ".join(devices))
    core = CacheCore(EngineConfig(capacity_bytes=args.capacity, devices=devices,
                                  chunk_size=args.chunk_size, disk_dir=args.disk_dir,
                                  disk_capacity_bytes=args.disk_capacity,
                                  remote_url=args.remote_url, events_address=args.events,
                                  vllm_events_address=args.vllm_events,
                                  vllm_events_topic=args.vllm_events_topic,
                                  prefault={"background": "background", "sync": True,
                                            "off": False}[args.prefault]),
                     shared=True)
    server = CacheServer(core, config)
    admin = None
    if args.http_port is not None:
        from gpukv.frontend.admin import start_admin

        admin = start_admin(core, port=args.http_port, host=args.http_host,
                            allow_remote=args.allow_remote, token_file=args.http_token_file,
                            clients=lambda: server.sessions.num_sessions)
        log.info("gpukv admin endpoint on %s (/healthcheck; /metrics /status POST /clear with "
                 "the token in %s)", admin.url, admin.token_file)
    sys.setswitchinterval(0.001)  # the loop waits less for the GIL behind a pool thread
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: server.stop())
    try:
        if admin is not None:
            admin.set_ready()  # the socket is bound; the loop starts now
        server.serve_forever()
    finally:
        if admin is not None:
            admin.stop()
        core.close(flush_timeout_s=args.flush_timeout)
    return 0
