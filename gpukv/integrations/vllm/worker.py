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

Every copy is a job on the worker's threads (:mod:`.transfers`). A load the step needs waits for
the server at most ``wait_budget_s`` (from the step's first wait), then is cancelled (vLLM
recomputes it); a store is never cancelled for time (its chunks would be lost for every later
request): asynchronous stores never make a step wait, synchronous ones wait as stores always
did. The modes:

- loads ``"sync"``: :meth:`load` (vLLM's ``start_load_kv``, before the forward) returns once the
  step's loads are in their blocks (and, within the budget, their ends sent); ``"layerwise"``: it returns at once and :meth:`wait_layer`
  (``wait_for_layer_load``) waits for one layer's slices of them; ``"async"``: vLLM's
  asynchronous loads -- the request waits in vLLM, :meth:`load` queues the copy (vLLM calls it
  after the forward) and :meth:`finished` reports it in ``finished_recving`` once done.
- stores ``"sync"``: :meth:`store` (``wait_for_save``) returns once the step's chunks are copied
  out of vLLM's blocks (however long the server takes to grant slots) and, within the budget,
  committed (a slow commit goes on on its thread); ``"async"``: it returns at once; the
  blocks of a finished request stay vLLM's until :meth:`finished` reports it
  (``finished_sending``), and :meth:`preempted` waits for a preempted request's stores before the
  forward that may overwrite its blocks.

A load that fails (the server does not hold a chunk any more, does not answer in time, the
plan could not load, or this rank is not registered) writes no byte, and its blocks go to what
vLLM collects through ``get_block_ids_with_load_errors`` (no later than the step that reports
an asynchronous load finished); vLLM then recomputes them (the connector makes the failure
policy "recompute" for gpukv's loads).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from typing import Any, Callable, Mapping

import torch

from gpukv.errors import Busy
from gpukv.frontend.client import ServerError, ServerUnavailable
from gpukv.integrations.vllm.config import LOAD_MODES, STORE_MODES
from gpukv.integrations.vllm.layouts import kv_views
from gpukv.integrations.vllm.plan import LoadSpec, StepPlan, StoreSpec, block_slots, stage_request_id
from gpukv.integrations.vllm.transfers import Job, Transfer, Transfers

log = logging.getLogger(__name__)

PROBE_S = 10.0
PROBE_TIMEOUT_S = 0.2
RETRY_MIN_S, RETRY_MAX_S = 1.0, 60.0
_TRANSIENT = (ServerUnavailable, Busy, ServerError)

__all__ = ["WorkerSide", "Transfer", "LOAD_MODES", "STORE_MODES"]


class WorkerSide:
    """One rank's connector work. ``client`` has the ``CacheClient`` API (register, unregister,
    begin_*_chunks, copy_layers, finish, abort, ping) plus :class:`.guard.GuardedClient`'s
    ``take_lost`` and ``down``. ``on_transfer(transfer)`` is called (on a copy thread) after each
    load and store ends (a stats recorder: bytes, seconds, success). ``inline``: run the copies
    in the calling thread (tests driving a worker step by step)."""

    def __init__(self, client: Any, *, instance_id: str, model: str, tp_rank: int, tp_size: int,
                 block_size: int = 16, stage: int = 0, num_stages: int = 1, load: bool = True,
                 store: bool = True, load_mode: str = "sync", store_mode: str = "sync",
                 wait_budget_s: float = 0.03, probe_s: float = PROBE_S,
                 on_transfer: Callable[[Transfer], None] | None = None, inline: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank {tp_rank} outside [0, tp_size={tp_size})")
        if not 0 <= stage < num_stages:
            raise ValueError(f"pipeline stage {stage} outside [0, {num_stages})")
        if load_mode not in LOAD_MODES or store_mode not in STORE_MODES:
            raise ValueError(f"load_mode must be one of {LOAD_MODES} and store_mode one of "
                             f"{STORE_MODES}, got {load_mode!r}, {store_mode!r}")
        self.block_size, self.load_mode, self.store_mode = block_size, load_mode, store_mode
        self.wait_budget_s = wait_budget_s
        self.transfers = Transfers(on_done=self._transfer_done, inline=inline)
        self._on_transfer = on_transfer
        self._deadline: float | None = None  # the step's budget, from its first wait
        self._step_loads: list[tuple[Job, LoadSpec]] = []  # sync/layerwise loads of this step
        self._async_loads: list[tuple[Job, LoadSpec]] = []  # async loads not reported yet
        self._releasing: set[str] = set()  # fenced requests to report once their copies are done
        self._recv_failed: set[str] = set()  # async loads that failed before any job ran
        self._layer_index: dict[str, int] = {}
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
        self._check: Future | None = None  # the server check in flight (see _heal)
        self._failed: set[int] = set()
        self.last_loads: list[Transfer] = []  # this step's sync / layerwise loads, once settled
        self.last_stores: list[tuple[str, int]] = []  # this step's queued stores: (request, tokens)
        self.num_loaded_tokens = self.num_stored_tokens = self.num_failed_loads = 0
        self.num_registrations = 0

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
        self._layer_index = {name: i for i, name in enumerate(self._views)}
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
        """Notice a server that forgot this worker, and register again when it is time. The
        server calls (a PING, a registration) run on a thread of their own, one check at a
        time, so a silent server never holds up a step."""
        if self.refused is not None or self._views is None:
            return
        if self._check is not None and not self._check.done():
            return
        now = self._clock()
        lost = self.client.take_lost()
        probe = self.registered and not lost and now >= self._next_probe and not self.client.down
        if probe:
            self._next_probe = now + self.probe_s
        if lost and self.registered:
            self._forgotten(now)
        if probe or (not self.registered and now >= self._retry_at):
            self._check = self.transfers.background(self._check_server, now, probe)

    def _forgotten(self, now: float) -> None:
        self.registered, self._retry_at = False, now
        if not self._incident:
            log.warning("gpukv: the server forgot %s (it restarted, or reaped this process's "
                        "session); registering again", self.instance_id)
            self._incident = True

    def _check_server(self, now: float, probe: bool) -> None:
        info = None
        if probe:
            info = self.client.ping(timeout_s=PROBE_TIMEOUT_S)
            if info is not None and info.get("pid") != self._server_pid and self.registered:
                self._forgotten(now)
            if self.registered:
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

    # ---- steps -------------------------------------------------------------------------------
    def _wait_deadline(self) -> float:
        if self._deadline is None:
            self._deadline = time.monotonic() + self.wait_budget_s
        return self._deadline

    def new_step(self) -> None:
        """A new engine step (vLLM bound its plan): the next wait starts its budget."""
        self._deadline = None

    def preempted(self, plan: StepPlan) -> None:
        """Before the step's forward: stores still reading the blocks of requests vLLM preempted
        are cancelled (not started) or waited for (copying)."""
        if plan.preempted:
            self.transfers.fence(stage_request_id(r, self.stage, self.num_stages) for r in plan.preempted)

    # ---- loads -------------------------------------------------------------------------------
    def load(self, plan: StepPlan) -> None:
        """Queue the step's loads into this rank's pages; ``"sync"``: return once they are in
        (see the module docstring). A load that does not complete writes nothing and its blocks
        are reported (see :meth:`take_failed_blocks`)."""
        self._heal()
        self.last_loads = []
        for spec in plan.loads:
            job = self._submit_load(spec)
            if job is None:
                self.last_loads.append(Transfer("load", spec.request_id, len(spec.hashes) * self.client.chunk_size,
                                                0, 0.0, ok=False))
                self._load_failed(spec)
                if self.load_mode == "async":
                    self._recv_failed.add(spec.request_id)  # reported as finished, with its blocks
            elif self.load_mode == "async":
                self._async_loads.append((job, spec))
            else:
                self._step_loads.append((job, spec))
        if self.load_mode == "sync":
            self._settle_loads()

    def _submit_load(self, spec: LoadSpec) -> Job | None:
        if not (spec.hashes and self.registered and self.load_enabled):
            return None
        rid = stage_request_id(spec.request_id, self.stage, self.num_stages)
        layers = len(self._views) if self.load_mode == "layerwise" else 0
        job = Job("load", rid, len(spec.hashes) * self.client.chunk_size, layers, _model_stream(self._views))
        slots = torch.from_numpy(block_slots(spec.blocks, self.block_size))
        return self.transfers.submit(job, lambda j: self._run_load(j, spec, slots))

    def _run_load(self, job: Job, spec: LoadSpec, slots: torch.Tensor) -> Transfer:
        if job.cancelled:
            return self._result(job, 0, ok=False)
        copy = self.client.begin_retrieve_chunks(self.instance_id, spec.hashes, slots,
                                                 request_id=job.request_id)
        if copy is None or (copy.grant is None and copy.tokens == 0):  # a chunk is missing
            return self._result(job, 0, ok=False)
        if not job.claim():  # the step gave up on it: nothing written
            self.client.abort(copy)
            return self._result(job, 0, ok=False)
        if copy.grant is not None:
            for layer in range(len(job.layers)):  # layer by layer, each fenced
                self.client.copy_layers(copy, layer + 1).wait()
                job.layer_copied(layer)
            if copy.layers_queued < copy.num_layers:
                self.client.copy_layers(copy).wait()
        job.end_copy(True)
        self.client.finish(copy)  # the end of the retrieve: its shares go (the bytes are in)
        return self._result(job, job.asked, nbytes=copy.nbytes)

    def wait_layer(self, layer_name: str) -> None:
        """``"layerwise"``: wait until this step's loads have this layer's slices in vLLM's
        pages (a load that cannot start within the budget is cancelled and reported)."""
        index = self._layer_index.get(layer_name)
        if index is None or not self._step_loads:
            return
        deadline = self._wait_deadline()
        for job, _ in self._step_loads:
            if job.wait_started(deadline):
                job.layers[index].wait()

    def _settle_loads(self) -> None:
        """Wait for this step's sync/layerwise loads to be copied (or cancelled), and note the
        failed ones."""
        deadline = self._wait_deadline()
        for job, spec in self._step_loads:
            if job.wait_started(deadline):
                job.copied.wait()
                job.done.wait(max(0.0, deadline - time.monotonic()))  # its end, within the budget
            if job.ok:
                self.num_loaded_tokens += job.asked
            else:
                self._load_failed(spec)
            self.last_loads.append(Transfer("load", spec.request_id, job.asked, job.asked if job.ok else 0,
                                            time.perf_counter() - job.t0, ok=bool(job.ok)))
        self._step_loads = []

    def _load_failed(self, spec: LoadSpec) -> None:
        self._failed.update(spec.report_blocks)
        self.num_failed_loads += 1

    # ---- stores ------------------------------------------------------------------------------
    def store(self, plan: StepPlan) -> None:
        """After the forward: queue the step's stores from this rank's pages (MLA: TP rank 0
        only, the other ranks hold the same bytes); ``"sync"``: return once they are copied out
        of vLLM's blocks. Also ends the step's layer-by-layer loads."""
        if self._step_loads:
            self._settle_loads()
        self.last_stores = []
        if not (plan.stores and self.registered and self.store_enabled) or (
                self.kind == "mla" and self.tp_rank != 0):
            return
        jobs = [self._submit_store(spec) for spec in plan.stores]
        self.last_stores = [(job.request_id, job.asked) for job in jobs]
        if self.store_mode == "sync":  # as before the threads: the step waits for the copies
            deadline = self._wait_deadline()
            for job in jobs:
                job.copied.wait()
                job.done.wait(max(0.0, deadline - time.monotonic()))  # the commit, within the budget

    def _submit_store(self, spec: StoreSpec) -> Job:
        job = Job("store", spec.request_id, len(spec.hashes) * self.client.chunk_size,
                  stream=_model_stream(self._views))
        slots = torch.from_numpy(block_slots(spec.blocks, self.block_size))
        return self.transfers.submit(job, lambda j: self._run_store(j, spec, slots))

    def _run_store(self, job: Job, spec: StoreSpec, slots: torch.Tensor) -> Transfer:
        if job.cancelled:
            return self._result(job, 0, ok=False)
        copy = self.client.begin_store_chunks(self.instance_id, spec.hashes, slots)
        if copy is None:  # the server failed the call (logged by the guard)
            return self._result(job, 0, ok=False)
        if copy.grant is None:  # every chunk is cached already
            job.end_copy(True)
            return self._result(job, 0)
        if not job.claim():  # cancelled (preempted, or the step gave up): nothing committed
            self.client.abort(copy)
            return self._result(job, 0, ok=False)
        self.client.copy_layers(copy).wait()
        job.end_copy(True)
        stored = self.client.finish(copy)  # the commit
        return self._result(job, stored, nbytes=copy.nbytes)

    # ---- completions -------------------------------------------------------------------------
    def finished(self, plan: StepPlan) -> tuple[set[str], set[str]]:
        """vLLM's ``get_finished`` for this step: (fenced requests whose copies are done with
        their blocks, requests whose asynchronous load is done); the failed loads' blocks are
        in :meth:`take_failed_blocks` from now on."""
        if self._step_loads:
            self._settle_loads()
        self._releasing.update(plan.released)
        sending = {r for r in self._releasing
                   if self.transfers.quiet(stage_request_id(r, self.stage, self.num_stages))}
        self._releasing -= sending
        recving, waiting = set(), []
        for job, spec in self._async_loads:
            if not job.done.is_set():
                waiting.append((job, spec))
                continue
            recving.add(spec.request_id)
            if job.ok:
                self.num_loaded_tokens += job.asked
            else:
                self._load_failed(spec)
        recving |= self._recv_failed
        self._recv_failed = set()
        self._async_loads = waiting
        return sending, recving

    def _result(self, job: Job, done: int, *, ok: bool = True, nbytes: int = 0) -> Transfer:
        return Transfer(job.op, job.request_id, job.asked, done, time.perf_counter() - job.t0, nbytes, ok)

    def _transfer_done(self, transfer: Transfer) -> None:
        if transfer.op == "store":
            self.num_stored_tokens += transfer.done
        if self._on_transfer is not None:
            self._on_transfer(transfer)

    def take_completed(self) -> list[Transfer]:
        """The transfers that ended since the last call."""
        return self.transfers.take_completed()

    def take_failed_blocks(self) -> set[int]:
        """Block ids whose load failed since the last call (vLLM asks once per step)."""
        failed, self._failed = self._failed, set()
        return failed

    def close(self) -> None:
        self.transfers.close()
        if self.registered:
            self.client.unregister(self.instance_id)
            self.registered = False


def _model_stream(views: Mapping[str, torch.Tensor] | None) -> torch.cuda.Stream | None:
    """The stream the model's work is queued on now (CUDA), for the copy threads to queue theirs
    behind it; None on CPU."""
    if not views:
        return None
    device = next(iter(views.values())).device
    return torch.cuda.current_stream(device) if device.type == "cuda" else None
