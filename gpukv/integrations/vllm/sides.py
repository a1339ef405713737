"""The connector's two sides built from vLLM's configuration: the server connection each process
opens (:func:`connect`, autostarting ``gpukv serve`` if told to), the scheduler side (its
reports and its planner, :func:`scheduler_side`) in the EngineCore process, one worker side per
rank (:func:`worker_side`).

Failure policy: vLLM's scheduler reads ``kv_load_failure_policy`` once, right after it builds
the connector (``vllm/v1/core/sched/scheduler.py``); with ``"fail"`` it fails every request
whose load a connector reports failed. gpukv is a cache, so the scheduler side sets the policy to
``"recompute"`` there (logged once): a gpukv failure never fails a request. (Inside vLLM's
MultiConnector the policy is the outer configuration's, which this connector cannot see: set it
to ``"recompute"`` there.)
"""

from __future__ import annotations

import logging
import os
from typing import Any

from gpukv.frontend.client import CacheClient, ServerUnavailable
from gpukv.integrations.vllm.autostart import ensure_server
from gpukv.integrations.vllm.calls import ServerCalls
from gpukv.integrations.vllm.config import ConnectorConfig
from gpukv.integrations.vllm.guard import GuardedClient
from gpukv.integrations.vllm.kv_groups import Parts
from gpukv.integrations.vllm.planner import SchedulerPlanner
from gpukv.integrations.vllm.reports import SchedulerReports
from gpukv.integrations.vllm.thread_cpus import ThreadCpus
from gpukv.integrations.vllm.topology import worker_stage_index
from gpukv.integrations.vllm.translate import tp_rank
from gpukv.integrations.vllm.worker import WorkerSide

log = logging.getLogger(__name__)


def connect(cfg: ConnectorConfig, address: str, group: str, thread_cpus: ThreadCpus | None = None
            ) -> tuple[GuardedClient | None, bool, str | None]:
    """Find (or autostart) the server and connect: (the guarded client, whether this process
    started the server, why there is no connection or None). The client's threads (its
    socket I/O thread, its ping thread) start on ``thread_cpus``."""
    started = False
    try:
        if cfg.autostart:
            serve_args = list(cfg.autostart_args)
            if cfg.chunk_size is not None and "--chunk-size" not in serve_args:
                serve_args += ["--chunk-size", str(cfg.chunk_size)]
            _, started = ensure_server(address, serve_args=serve_args)
        with (thread_cpus or ThreadCpus()).starting():
            raw = CacheClient(address, group=group, timeout_s=cfg.timeout_s)
    except (ServerUnavailable, RuntimeError, OSError) as exc:
        return None, started, (f"no gpukv server at {address} ({exc}); start `gpukv serve --address "
                               f"{address}`, or set \"gpukv.autostart\": true, and restart the engine")
    return GuardedClient(raw), started, None


def scheduler_side(vllm_config: Any, cfg: ConnectorConfig, client: Any, parts: Parts, *,
                   block_size: int) -> tuple[SchedulerReports, SchedulerPlanner]:
    """The scheduler's reports and planner (its lookups go through the reports' client, which
    records the hits' sources) for the engine's ``parts`` (pipeline stages x KV cache groups);
    sets the failure policy (see the module docstring)."""
    ktc = vllm_config.kv_transfer_config
    if cfg.load and ktc.kv_load_failure_policy != "recompute":
        log.warning("gpukv: kv_load_failure_policy was %r; gpukv sets it to \"recompute\" for "
                    "this engine (a chunk gpukv cannot deliver is recomputed, never a failed "
                    "request)", ktc.kv_load_failure_policy)
        ktc.kv_load_failure_policy = "recompute"
    tp_size = int(vllm_config.parallel_config.tensor_parallel_size)
    events = vllm_config.kv_events_config
    reports = SchedulerReports(
        client, parts, tp_size=tp_size, block_size=block_size, store=cfg.store,
        kv_events=bool(events is not None and events.enable_kv_cache_events))
    planner = SchedulerPlanner(
        reports.lookups, list(parts.stage_keys), groups=parts.groups, tp_size=tp_size,
        chunk_size=client.chunk_size,
        block_size=block_size, load=cfg.load, store=cfg.store, relookup_s=cfg.relookup_s,
        lookup_wait_s=cfg.lookup_wait_s, max_in_flight=int(vllm_config.max_concurrent_batches),
        loadable=True, async_loads=cfg.load_mode == "async", async_stores=cfg.store_mode == "async",
        calls=ServerCalls(cfg.step_budget_s))
    if cfg.events_address is not None:
        log.warning("gpukv: \"gpukv.events_address\" is not used any more: the blocks gpukv "
                    "holds reach vLLM's KV events through the server when it runs with "
                    "--vllm-events")
    return reports, planner


def worker_side(vllm_config: Any, cfg: ConnectorConfig, client: Any, parts: Parts, *,
                group: str, block_size: int, thread_cpus: ThreadCpus | None = None) -> WorkerSide:
    """This rank's worker side (its instance id names the engine group, stage, rank and pid),
    one registration per KV cache group of its stage; its copy threads run on ``thread_cpus``."""
    parallel = vllm_config.parallel_config
    stage, rank = worker_stage_index(parallel), tp_rank(parallel)
    return WorkerSide(
        client, instance_id=f"{group}-pp{stage}-tp{rank}-{os.getpid()}",
        model=[parts.key(stage, g) for g in range(parts.num_groups)], groups=parts.groups,
        tp_rank=rank, tp_size=int(parallel.tensor_parallel_size), block_size=block_size, stage=stage,
        num_stages=parts.num_stages, load=cfg.load, store=cfg.store, load_mode=cfg.load_mode,
        store_mode=cfg.store_mode, wait_budget_s=cfg.wait_budget_s,
        thread_init=(thread_cpus or ThreadCpus()).enter)
