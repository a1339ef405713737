"""Worker side of the vLLM connector: vLLM's own KV tensors, registered with gpukv, and each step's
loads and stores run on them through the client (nothing here imports vLLM).

- **Registration fails closed.** A layout gpukv cannot map, or a server that refuses the worker
  (no arena for its GPU, a layout that differs from the model's), leaves the worker uncached for
  good, logged once; a server that does not answer or is busy is asked again later (backing off
  from ``RETRY_MIN_S`` to ``RETRY_MAX_S``). Unregistered, the worker stores nothing and reports
  every planned load failed; the scheduler's lookups count no chunk for an engine whose workers
  are not all registered, so such loads are not planned in the first place.
- **A server restart heals.** When a call is refused because the server forgot this worker (it
  restarted, or reaped this process's session: :attr:`.guard.GuardedClient.lost`), or a PING
  every ``probe_s`` shows another server process, the worker registers again (same backoff,
  logged once per incident). A server that comes back with another chunk size or salt cannot
  serve this engine's plans: the worker stays uncached until the engine restarts.
- Pipeline parallelism: the worker registers its stage's model key and loads under its stage's
  request id (:func:`.plan.stage_request_id`). MLA: only TP rank 0 of a stage stores (every
  rank holds the same latent bytes); every rank loads.

A failed load (the server returns fewer tokens than asked, the plan could not load, or this rank
is not registered) adds the request's loaded blocks to what vLLM collects through
``get_block_ids_with_load_errors``; vLLM then recomputes them (the connector makes the failure
policy "recompute" for gpukv's loads). Retrieve is all or nothing, so a failed load writes no byte.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from gpukv.errors import Busy
from gpukv.frontend.client import ServerError, ServerUnavailable
from gpukv.integrations.vllm.layouts import kv_views
from gpukv.integrations.vllm.plan import StepPlan, stage_request_id
from gpukv.integrations.vllm.stats import TransferRecorder, failures, token_bytes

log = logging.getLogger(__name__)

PROBE_S = 10.0
PROBE_TIMEOUT_S = 0.2
RETRY_MIN_S, RETRY_MAX_S = 1.0, 60.0
_TRANSIENT = (ServerUnavailable, Busy, ServerError)


@dataclass(frozen=True, slots=True)
class Transfer:
    """One load or store of a step, as the worker side ran it: ``asked`` tokens (a load: all or
    nothing; a store: the full chunks offered, from token 0), ``done`` tokens (a load: ``asked``
    or 0; a store: the tokens newly stored), ``seconds`` of wall time (RPCs and the copy)."""

    request_id: str
    asked: int
    done: int
    seconds: float


class WorkerSide:
    """One rank's connector work. ``client`` has the ``CacheClient`` API (register, unregister,
    retrieve, store, ping) plus :class:`.guard.GuardedClient`'s ``take_lost`` and ``down``."""

    def __init__(self, client: Any, *, instance_id: str, model: str, tp_rank: int, tp_size: int,
                 stage: int = 0, num_stages: int = 1, load: bool = True, store: bool = True,
                 probe_s: float = PROBE_S, clock: Callable[[], float] = time.monotonic) -> None:
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank {tp_rank} outside [0, tp_size={tp_size})")
        if not 0 <= stage < num_stages:
            raise ValueError(f"pipeline stage {stage} outside [0, {num_stages})")
        self.client, self.instance_id, self.model = client, instance_id, model
        self.tp_rank, self.tp_size, self.stage, self.num_stages = tp_rank, tp_size, stage, num_stages
        self.load_enabled, self.store_enabled = load, store
        self.probe_s, self._clock = probe_s, clock
        self.kind: str | None = None  # the layout kind, once vLLM's tensors are mapped
        self.registered = False
        self.refused: str | None = None  # why this worker runs uncached for good
        self._views: dict[str, torch.Tensor] | None = None
        self._dims = ""
        self._server_pid = None
        self._retry_at = float("inf")
        self._backoff = RETRY_MIN_S
        self._next_probe = 0.0
        self._incident = False  # a registration problem was logged and is not healed yet
        self._failed: set[int] = set()
        self.last_loads: list[Transfer] = []
        self.last_stores: list[Transfer] = []
        self.num_loaded_tokens = self.num_stored_tokens = self.num_failed_loads = 0
        self.num_registrations = 0
        self.stats = TransferRecorder()  # bytes, seconds and failures of each load and store
        self.token_bytes = 0  # one token's KV in this rank's pages, all layers

    # ---- registration ------------------------------------------------------------------------
    def register(self, kv_caches: Mapping[str, torch.Tensor], backend: str) -> bool:
        """Register vLLM's own tensors (views of them) with the server; whether it is registered
        now (if not, the worker runs uncached: see the module docstring)."""
        if self._views is not None:
            raise ValueError(f"instance {self.instance_id!r} already has its KV tensors")
        try:
            self._views, self._dims, self.kind = kv_views(kv_caches, backend)
        except (ValueError, TypeError) as exc:
            self.refuse(str(exc))
            return False
        self.token_bytes = token_bytes(self._views, self._dims)
        self._server_pid = self.client.server_info.get("pid")
        return self._register()

    def _register(self) -> bool:
        try:
            self.client.register(self.instance_id, self.model, self._views, self._dims, kind=self.kind,
                                 tp_rank=self.tp_rank, tp_size=self.tp_size)
        except _TRANSIENT as exc:
            self._retry_later(f"registering {self.instance_id} failed ({type(exc).__name__}: {exc})")
            return False
        except ValueError as exc:
            if "already registered" not in str(exc):  # the server refuses this worker
                self.refuse(f"the server refused the registration: {exc}")
                return False
        self.registered, self._retry_at, self._backoff = True, float("inf"), RETRY_MIN_S
        self.num_registrations += 1
        if self._incident:
            log.warning("gpukv: %s registered again; caching resumes", self.instance_id)
            self._incident = False
        return True

    def _retry_later(self, why: str) -> None:
        self._retry_at = self._clock() + self._backoff
        if not self._incident:
            log.warning("gpukv: %s; running uncached, trying again (backing off up to %.0f s)",
                        why, RETRY_MAX_S)
        self._incident, self._backoff = True, min(RETRY_MAX_S, self._backoff * 2)

    def refuse(self, reason: str) -> None:
        """Run uncached for good (logged once, naming ``reason``)."""
        self.refused, self.registered = reason, False
        log.error("gpukv: %s; worker %s runs uncached", reason, self.instance_id)

    def _heal(self) -> None:
        """Notice a server that forgot this worker, and register again when it is time."""
        if self.refused is not None or self._views is None:
            return
        now = self._clock()
        info = None
        lost = self.client.take_lost()
        if self.registered and not lost and now >= self._next_probe and not self.client.down:
            self._next_probe = now + self.probe_s
            info = self.client.ping(timeout_s=PROBE_TIMEOUT_S)
            lost = info is not None and info.get("pid") != self._server_pid
        if lost and self.registered:
            self.registered, self._retry_at = False, now
            if not self._incident:
                log.warning("gpukv: the server forgot %s (it restarted, or reaped this process's "
                            "session); registering again", self.instance_id)
                self._incident = True
        if self.registered or now < self._retry_at:
            return
        info = info or self.client.ping(timeout_s=PROBE_TIMEOUT_S)  # the server to register with
        if info is None:
            self._retry_later(f"the server does not answer {self.instance_id}'s PING")
        elif (info.get("chunk_size"), info.get("salt")) != (self.client.chunk_size,
                                                            self.client.server_info.get("salt")):
            self.refuse(f"the server restarted with chunk size {info.get('chunk_size')} (this engine "
                        f"plans for {self.client.chunk_size}) or another salt")
        else:
            self._server_pid = info.get("pid")
            self._register()

    # ---- transfers ---------------------------------------------------------------------------
    def load(self, plan: StepPlan) -> list[Transfer]:
        """Run the step's loads into this rank's pages (before the forward reads them). A load
        that does not complete writes nothing and its blocks are reported (see
        :meth:`take_failed_blocks`)."""
        self._heal()
        done = []
        for spec in plan.loads:
            asked, got, t0 = len(spec.token_ids), 0, time.perf_counter()
            if asked and self.registered and self.load_enabled:
                got = self.client.retrieve(self.instance_id, spec.token_ids,
                                           torch.from_numpy(spec.slot_mapping),
                                           request_id=stage_request_id(spec.request_id, self.stage,
                                                                       self.num_stages),
                                           seed=spec.seed, extras=spec.extras)
            if asked and got == asked:
                self.num_loaded_tokens += asked
            else:  # all or nothing: no byte was written
                self._failed.update(spec.block_ids)
                self.num_failed_loads += 1
                got = 0
            done.append(Transfer(spec.request_id, asked, got, time.perf_counter() - t0))
            written = int((spec.slot_mapping >= 0).sum()) if got else 0
            self.stats.record("load", written * self.token_bytes, done[-1].seconds, ok=bool(got))
        self.last_loads = done
        return done

    def store(self, plan: StepPlan) -> list[Transfer]:
        """Run the step's stores from this rank's pages (after the forward wrote them). MLA: TP
        rank 0 only, the other ranks hold the same bytes."""
        self.last_stores = done = []
        if not (plan.stores and self.registered and self.store_enabled) or (
                self.kind == "mla" and self.tp_rank != 0):
            return done
        for spec in plan.stores:
            t0, failed = time.perf_counter(), failures(self.client, "store")
            stored = self.client.store(self.instance_id, spec.token_ids,
                                       torch.from_numpy(spec.slot_mapping),
                                       seed=spec.seed, extras=spec.extras)
            self.num_stored_tokens += stored
            done.append(Transfer(spec.request_id, len(spec.token_ids), stored, time.perf_counter() - t0))
            self.stats.record("store", stored * self.token_bytes, done[-1].seconds,
                              ok=failures(self.client, "store") == failed)
        return done

    def take_failed_blocks(self) -> set[int]:
        """Block ids whose load failed since the last call (vLLM asks once per step)."""
        failed, self._failed = self._failed, set()
        return failed

    def close(self) -> None:
        if self.registered:
            self.client.unregister(self.instance_id)
            self.registered = False
