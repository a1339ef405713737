"""Worker side of the vLLM connector: each step's loads and stores on vLLM's own KV tensors,
through the client (nothing here imports vLLM). Registration and its healing after a server
restart: :mod:`.registration` (unregistered, the worker stores nothing and reports every planned
load failed). Pipeline parallelism: loads run under the stage's request id
(:func:`.plan.stage_request_id`). MLA: only TP rank 0 of a stage stores (every rank holds the
same latent bytes); every rank loads.

Every copy is a job on the worker's threads (:mod:`.transfers`). A load the step needs waits for
the server at most ``wait_budget_s`` (from the step's first wait), then is cancelled (vLLM
recomputes it); a store is never cancelled for time (its chunks would be lost for every later
request): asynchronous stores never make a step wait, synchronous ones wait as stores always
did. The modes:

- loads ``"sync"``: :meth:`load` (vLLM's ``start_load_kv``, before the forward) returns once the
  step's loads are in their blocks (and, within the budget, their ends sent); ``"layerwise"``: it
  returns at once and :meth:`wait_layer` (``wait_for_layer_load``) waits for one layer's slices;
  ``"async"``: vLLM's asynchronous loads -- the request waits in vLLM, :meth:`load` queues the
  copy (vLLM calls it after the forward) and :meth:`finished` reports it in
  ``finished_recving`` once done.
- stores ``"sync"``: :meth:`store` (``wait_for_save``) returns once the step's chunks are copied
  out of vLLM's blocks and, within the budget, committed; ``"async"``: it returns at once; the
  blocks of a finished request stay vLLM's until :meth:`finished` reports it
  (``finished_sending``), and :meth:`preempted` waits for a preempted request's stores before the
  forward that may overwrite its blocks.

A load that fails (a chunk gone, no answer in time, a plan that could not load, an unregistered
rank) writes no byte; its blocks go to ``get_block_ids_with_load_errors`` (no later than the
step that reports an asynchronous load finished) and vLLM recomputes them.

KV cache groups (:mod:`.kv_groups`): one registration per group (:mod:`.group_registrations`),
and each job copies every group's share, all or nothing (:mod:`.group_copies`). With several
groups a failed load is reported by request (:meth:`take_failed_requests`: vLLM's
``failed_recving``); with a sliding-window group a step waits, before its forward, for the stores
still copying (:meth:`new_step`).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping

import torch

from gpukv.integrations.vllm.config import LOAD_MODES, STORE_MODES
from gpukv.integrations.vllm.group_copies import GroupRow, rows_of, run_load, run_store
from gpukv.integrations.vllm.kv_groups import ONE_GROUP, KVGroup, part_request_id
from gpukv.integrations.vllm.plan import LoadSpec, StepPlan, StoreSpec, stage_request_id
from gpukv.integrations.vllm.group_registrations import GroupRegistrations
from gpukv.integrations.vllm.registration import PROBE_S
from gpukv.integrations.vllm.stats import TransferRecorder, token_bytes
from gpukv.integrations.vllm.transfers import Job, Transfer, Transfers, model_stream

__all__ = ["WorkerSide", "Transfer", "LOAD_MODES", "STORE_MODES"]


class WorkerSide:
    """One rank's connector work. ``client`` has the ``CacheClient`` API (register, unregister,
    begin_*_chunks, copy_layers, finish, abort, ping) plus :class:`.guard.GuardedClient`'s
    ``take_lost`` and ``down``. :attr:`stats` records each load and store when it ends (on a copy
    thread): bytes, seconds from submission, success. ``inline``: run the copies in the calling
    thread (tests driving a worker step by step); ``thread_init`` runs first on each copy thread
    (:meth:`.thread_cpus.ThreadCpus.enter`). ``groups``: the engine's KV cache groups
    (:mod:`.kv_groups`), ``model`` then one key per group (a str for one group): one registration
    per group, each copy covers every group (all or nothing)."""

    def __init__(self, client: Any, *, instance_id: str, model: str | list[str], tp_rank: int, tp_size: int,
                 groups: tuple[KVGroup, ...] = ONE_GROUP,
                 block_size: int = 16, stage: int = 0, num_stages: int = 1, load: bool = True,
                 store: bool = True, load_mode: str = "sync", store_mode: str = "sync",
                 wait_budget_s: float = 0.02, probe_s: float = PROBE_S, inline: bool = False,
                 clock: Callable[[], float] = time.monotonic, thread_init: Callable[[], None] | None = None) -> None:
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank {tp_rank} outside [0, tp_size={tp_size})")
        if not 0 <= stage < num_stages:
            raise ValueError(f"pipeline stage {stage} outside [0, {num_stages})")
        if load_mode not in LOAD_MODES or store_mode not in STORE_MODES:
            raise ValueError(f"load_mode must be one of {LOAD_MODES} and store_mode one of "
                             f"{STORE_MODES}, got {load_mode!r}, {store_mode!r}")
        self.block_size, self.load_mode, self.store_mode = block_size, load_mode, store_mode
        self.wait_budget_s = wait_budget_s
        self.transfers = Transfers(on_done=self._transfer_done, inline=inline, thread_init=thread_init)
        self._deadline: float | None = None  # the step's budget, from its first wait
        self._step_loads: list[tuple[Job, LoadSpec]] = []  # sync/layerwise loads of this step
        self._async_loads: list[tuple[Job, LoadSpec]] = []  # async loads not reported yet
        self._releasing: set[str] = set()  # fenced requests to report once their copies are done
        self._recv_failed: set[str] = set()  # async loads that failed before any job ran
        self.client, self.stage, self.num_stages = client, stage, num_stages
        self.instance_id, self.tp_rank = instance_id, tp_rank
        self.load_enabled, self.store_enabled = load, store
        self.groups = groups
        self.registrations = GroupRegistrations(
            client, instance_id=instance_id, models=[model] if isinstance(model, str) else model,
            groups=groups, tp_rank=tp_rank, tp_size=tp_size, probe_s=probe_s, clock=clock)
        self.registration = self.registrations.all[0]  # group 0's: layer names, views, kind
        self._fence_stores = any(g.sliding for g in groups)  # vLLM frees out-of-window blocks
        self._failed_requests: set[str] = set()  # several groups: failed loads, by request
        self._failed: set[int] = set()
        self.last_loads: list[Transfer] = []  # this step's sync / layerwise loads, once settled
        self.last_stores: list[tuple[str, int]] = []  # this step's queued stores: (request, tokens)
        self.num_loaded_tokens = self.num_stored_tokens = self.num_failed_loads = 0
        self.stats = TransferRecorder()  # bytes, seconds and failures of each load and store
        self.token_bytes = 0  # one token's KV in this rank's pages, all layers

    # ---- registration (see :mod:`.registration`) ----------------------------------------------
    def register(self, kv_caches: Mapping[str, torch.Tensor], backend: str) -> bool:
        """Register vLLM's own tensors (each group's layers with its registration); whether it is
        registered now (else it runs uncached)."""
        registered = self.registrations.register(kv_caches, backend)
        self.token_bytes = sum(self.registrations.token_bytes)
        return registered

    def refuse(self, reason: str) -> None:
        self.registrations.refuse(reason)

    @property
    def registered(self) -> bool:
        return self.registrations.registered

    @property
    def refused(self) -> str | None:
        return self.registrations.refused

    @property
    def kind(self) -> str | None:
        return self.registration.kind

    @property
    def num_registrations(self) -> int:
        return self.registrations.num_registrations

    # ---- steps -------------------------------------------------------------------------------
    def _wait_deadline(self) -> float:
        if self._deadline is None:
            self._deadline = time.monotonic() + self.wait_budget_s
        return self._deadline

    def new_step(self) -> None:
        """A new engine step (vLLM bound its plan, before its forward): the next wait starts its
        budget. With a sliding-window group, the stores still copying are waited for: vLLM's
        schedule of this step may have freed (and given to another request) a block outside a
        window that a store of the last step still reads."""
        self._deadline = None
        if self._fence_stores:
            self.transfers.settle("store", self._wait_deadline())

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
        self.registrations.heal(self.transfers.background)  # on a side thread
        self.last_loads = []
        for spec in plan.loads:
            job = self._submit_load(spec)
            if job is None:
                self.last_loads.append(Transfer("load", spec.request_id, len(spec.hashes) * self.client.chunk_size,
                                                0, 0.0, ok=False))
                self._load_failed(spec)
                self.stats.record("load", 0, 0.0, ok=False)
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
        views = self.registration.views
        layers = len(views) if self.load_mode == "layerwise" and len(self.groups) == 1 else 0
        job = Job("load", rid, len(spec.hashes) * self.client.chunk_size, layers, model_stream(views))
        rows = self._rows(spec.request_id, spec.hashes, spec.blocks, store=False)
        return self.transfers.submit(job, lambda j: self._run_load(j, rows))

    def _rows(self, request_id: str, hashes: list[bytes], blocks, *, store: bool) -> list[GroupRow]:
        groups = range(len(self.groups))
        return rows_of([r.instance_id for r in self.registrations.all],
                       [part_request_id(request_id, self.stage, self.num_stages, g, len(groups)) for g in groups],
                       self.registrations.token_bytes, hashes, blocks, self.block_size, store=store)

    def _run_load(self, job: Job, rows: list[GroupRow]) -> Transfer:
        written = None if job.cancelled else run_load(self.client, job, rows)
        if written is None:
            return self._result(job, 0, ok=False)
        return self._result(job, job.asked, nbytes=written)

    def wait_layer(self, layer_name: str) -> None:
        """``"layerwise"``: wait until this step's loads have this layer's slices in vLLM's
        pages (a load that cannot start within the budget is cancelled and reported)."""
        index = self.registration.layer_index.get(layer_name)
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
        """Report a failed load: its blocks (vLLM recomputes from the first), or, with several
        KV cache groups (vLLM cannot map block ids of several groups back to requests), the
        request (vLLM's ``failed_recving``: such a model loads asynchronously,
        :meth:`.config.ConnectorConfig.for_groups`)."""
        if len(self.groups) == 1:
            self._failed.update(spec.report_blocks)
        else:
            self._failed_requests.add(spec.request_id)
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
        job = Job("store", stage_request_id(spec.request_id, self.stage, self.num_stages),
                  len(spec.hashes) * self.client.chunk_size, stream=model_stream(self.registration.views))
        rows = self._rows(spec.request_id, spec.hashes, spec.blocks, store=True)
        return self.transfers.submit(job, lambda j: self._run_store(j, rows))

    def _run_store(self, job: Job, rows: list[GroupRow]) -> Transfer:
        stored = None if job.cancelled else run_store(self.client, job, rows)
        if stored is None:
            return self._result(job, 0, ok=False)
        return self._result(job, stored[0], nbytes=stored[1])

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
        recving, self._recv_failed, self._async_loads = recving | self._recv_failed, set(), waiting
        return sending, recving

    def _result(self, job: Job, done: int, *, ok: bool = True, nbytes: int = 0) -> Transfer:
        return Transfer(job.op, job.request_id, job.asked, done, time.perf_counter() - job.t0, nbytes, ok)

    def _transfer_done(self, transfer: Transfer) -> None:
        if transfer.op == "store":
            self.num_stored_tokens += transfer.done
        self.stats.record(transfer.op, transfer.nbytes, transfer.seconds, transfer.ok)

    def take_completed(self) -> list[Transfer]:
        """The transfers that ended since the last call."""
        return self.transfers.take_completed()

    def take_failed_requests(self) -> set[str]:
        """Requests whose asynchronous load failed since the last call (several KV cache
        groups; reported with the requests whose load is done, :meth:`finished`)."""
        failed, self._failed_requests = self._failed_requests, set()
        return failed

    def take_failed_blocks(self) -> set[int]:
        """Block ids whose load failed since the last call (vLLM asks once per step)."""
        failed, self._failed = self._failed, set()
        return failed

    def close(self) -> None:
        self.transfers.close()
        self.registrations.close()
