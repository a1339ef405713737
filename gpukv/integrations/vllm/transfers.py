"""A worker's copies in flight: each load or store is a :class:`Job` run on a thread of the
worker, and :class:`Transfers` keeps, per request, what its jobs still do with vLLM's blocks.

Why threads: a step must never wait on the server longer than a small budget. Every server call
of a copy (STORE_BEGIN / RETRIEVE_BEGIN, the commit / end) runs on one of two threads (loads,
stores: a store never delays a load); a step that needs a copy's bytes (a synchronous load before
the forward, a layer before its attention, a synchronous store before its blocks may change)
waits for the copy to *start* at most what is left of its budget, then cancels it (no byte moves,
the load is reported failed and vLLM recomputes it) -- and once a copy has started, for its bytes,
which is device work and no server's. So a stopped server costs a step at most the budget.

A job's life: queued -> begun (the books granted slots; a server call) -> copying (claimed: from
here it is not cancelled) -> copied (it no longer reads or writes vLLM's blocks) -> done (the
books were told: commit, end). ``copied`` is what frees a block for vLLM to reuse; ``done`` is
what lets the scheduler end the request on the server (a retrieve's end releases its shares).
Per layer, a load also marks each layer copied, for ``wait_for_layer_load``.

On CUDA the copies are queued from the job's thread on the stream that was current where the job
was submitted (the model's stream), so they are ordered with the model's work by the stream, and
their fences are waited for on the job's thread (UNTESTED on a GPU: no GPU ran this).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Transfer:
    """One load or store as the worker side ran it: ``asked`` tokens (a load: all or nothing; a
    store: the chunks offered), ``done`` tokens (a load: ``asked`` or 0; a store: the tokens newly
    stored), ``nbytes`` (in vLLM's layout: written into its pages, or newly stored), ``seconds``
    from submission to done, ``ok``: no failure (a store of chunks already cached is ok with
    ``done`` 0)."""

    op: str
    request_id: str
    asked: int
    done: int
    seconds: float
    nbytes: int = 0
    ok: bool = True


class Job:
    """One copy, run once by a worker thread (see the module docstring)."""

    __slots__ = ("op", "request_id", "asked", "t0", "stream", "_lock", "_state", "started",
                 "copied", "done", "layers", "ok", "transfer")

    def __init__(self, op: str, request_id: str, asked: int, num_layers: int = 0,
                 stream: torch.cuda.Stream | None = None) -> None:
        self.op, self.request_id, self.asked = op, request_id, asked
        self.t0 = time.perf_counter()
        self.stream = stream
        self._lock = threading.Lock()
        self._state = "queued"
        self.started = threading.Event()  # copying began, or the job will never copy
        self.copied = threading.Event()  # no longer touches vLLM's blocks
        self.done = threading.Event()  # the books were told
        self.layers = [threading.Event() for _ in range(num_layers)]  # layer l copied
        self.ok: bool | None = None  # the bytes moved (a load: all of them), known once copied
        self.transfer: Transfer | None = None

    def claim(self) -> bool:
        """The runner's turn to copy: False if the job was cancelled (then no byte may move)."""
        with self._lock:
            if self._state == "cancelled":
                return False
            self._state = "copying"
        self.started.set()
        return True

    def cancel(self) -> bool:
        """Whether the job will now never copy (True also if it ended without copying)."""
        with self._lock:
            if self._state == "queued":
                self._state = "cancelled"
            cancelled = self._state == "cancelled" or (self.copied.is_set() and not self.ok)
        return cancelled

    @property
    def cancelled(self) -> bool:
        return self._state == "cancelled"

    def layer_copied(self, layer: int) -> None:
        self.layers[layer].set()

    def end_copy(self, ok: bool) -> None:
        """No byte moves any more (``ok``: all of them moved)."""
        self.ok = ok
        self.started.set()
        for event in self.layers:
            event.set()
        self.copied.set()

    def end(self, transfer: Transfer) -> None:
        if not self.copied.is_set():
            self.end_copy(transfer.ok)
        self.transfer = transfer
        self.done.set()

    def wait_started(self, deadline: float) -> bool:
        """Wait until the copy started (or ended) or ``deadline`` (``time.monotonic``); if it did
        not start by then, cancel it. True if it started (its bytes are coming), False if it was
        cancelled or ended without copying."""
        if not self.started.wait(max(0.0, deadline - time.monotonic())) and self.cancel():
            return False
        self.started.wait()
        return not (self.copied.is_set() and not self.ok)


class Transfers:
    """A worker's job threads and, per request, its unfinished jobs. ``on_done(transfer)`` is
    called (on the job's thread) after each job ends. ``inline=True`` runs each job at once in
    the submitting thread (tests that drive a worker step by step)."""

    def __init__(self, on_done: Callable[[Transfer], None] | None = None, *, inline: bool = False,
                 thread_init: Callable[[], None] | None = None) -> None:
        self._thread_init = thread_init  # runs first on each of the threads (:mod:`.thread_cpus`)
        self._pools = {} if inline else {op: self._pool(f"gpukv-{op}s") for op in ("load", "store")}
        self._lock = threading.Lock()
        self._jobs: dict[str, list[Job]] = {}  # request id -> its jobs not done yet
        self._completed: list[Transfer] = []
        self._on_done = on_done
        self.closed = False

    def submit(self, job: Job, run: Callable[[Job], Transfer]) -> Job:
        """Run ``run(job)`` on the job's thread; it must end the job (:meth:`Job.end`)."""
        with self._lock:
            self._jobs.setdefault(job.request_id, []).append(job)
        if self._pools:
            self._pools[job.op].submit(self._run, job, run)
        else:
            self._run(job, run)
        return job

    def _run(self, job: Job, run: Callable[[Job], Transfer]) -> None:
        try:
            stream = torch.cuda.stream(job.stream) if job.stream is not None else contextlib.nullcontext()
            with stream:
                transfer = run(job)
        except Exception:  # noqa: BLE001 - a gpukv failure must never stop the engine: logged
            log.error("gpukv: a %s for request %s raised", job.op, job.request_id, exc_info=True)
            transfer = Transfer(job.op, job.request_id, job.asked, 0, time.perf_counter() - job.t0, ok=False)
        job.end(transfer)
        with self._lock:
            jobs = self._jobs.get(job.request_id)
            if jobs is not None:
                jobs.remove(job)
                if not jobs:
                    del self._jobs[job.request_id]
            self._completed.append(transfer)
        if self._on_done is not None:
            try:
                self._on_done(transfer)
            except Exception:  # noqa: BLE001 - a recorder's bug must not stop the copies
                log.error("gpukv: the transfer recorder raised", exc_info=True)

    def background(self, fn: Callable[..., object], *args: object) -> Future:
        """Run ``fn(*args)`` on the side thread (the worker's server checks; inline when the
        jobs are); an exception it raises is logged."""
        future: Future = Future()
        if not self._pools:
            future.set_result(fn(*args))
            return future
        pool = self._pools.get("side") or self._pools.setdefault("side", self._pool("gpukv-checks"))
        future = pool.submit(fn, *args)
        future.add_done_callback(_log_failure)
        return future

    def _pool(self, name: str) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(1, thread_name_prefix=name, initializer=self._thread_init)

    def jobs_of(self, request_id: str, op: str | None = None) -> list[Job]:
        with self._lock:
            return [j for j in self._jobs.get(request_id, ()) if op is None or j.op == op]

    def quiet(self, request_id: str) -> bool:
        """Whether no job of the request still uses its blocks or its server request: no store
        still copying and no load not done."""
        with self._lock:
            jobs = list(self._jobs.get(request_id, ()))
        return all(j.copied.is_set() if j.op == "store" else j.done.is_set() for j in jobs)

    def fence(self, request_ids: Iterable[str]) -> int:
        """Before vLLM reuses these requests' blocks (a preemption): cancel their stores that
        have not started copying and wait for those that have (device work, no server call).
        Returns how many jobs it cancelled."""
        jobs = [job for request_id in request_ids for job in self.jobs_of(request_id, "store")]
        copying = [job for job in jobs if not job.cancel()]  # every one first, then the waits
        for job in copying:
            job.copied.wait()
        return len(jobs) - len(copying)

    def settle(self, op: str, deadline: float) -> int:
        """Before vLLM may reuse blocks the jobs of ``op`` read (a sliding window's, freed at a
        schedule): each waits until it starts copying, or is cancelled if it has not by
        ``deadline`` (``time.monotonic``), then until it is copied. Returns how many it
        cancelled."""
        with self._lock:
            jobs = [j for js in self._jobs.values() for j in js if j.op == op]
        cancelled = 0
        for job in jobs:
            if job.wait_started(deadline):
                job.copied.wait()
            elif job.cancelled:
                cancelled += 1
        return cancelled

    def take_completed(self) -> list[Transfer]:
        with self._lock:
            done, self._completed = self._completed, []
        return done

    def drain(self, timeout_s: float) -> bool:
        """Let the queued jobs run for up to ``timeout_s``; whether all are done."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            jobs = [j for js in self._jobs.values() for j in js]
        return all(j.done.wait(max(0.0, deadline - time.monotonic())) for j in jobs)

    def close(self, timeout_s: float = 5.0) -> None:
        """Cancel the jobs that have not started copying, let the others end for up to
        ``timeout_s`` (their commits and ends), then stop the threads."""
        self.closed = True
        with self._lock:
            jobs = [j for js in self._jobs.values() for j in js]
        for job in jobs:
            job.cancel()
        self.drain(timeout_s)
        for pool in self._pools.values():
            pool.shutdown(wait=False, cancel_futures=False)


def _log_failure(future: Future) -> None:
    exc = None if future.cancelled() else future.exception()
    if exc is not None:
        log.error("gpukv: a worker's server check raised", exc_info=exc)


def model_stream(views: Mapping[str, torch.Tensor] | None) -> torch.cuda.Stream | None:
    """The stream the model's work is queued on now (CUDA), for the copy threads to queue theirs
    behind it; None on CPU."""
    if not views:
        return None
    device = next(iter(views.values())).device
    return torch.cuda.current_stream(device) if device.type == "cuda" else None
