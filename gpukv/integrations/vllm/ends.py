"""``RequestEnds``: the finished requests whose end on the server waits for their copies.

vLLM frees a finished request's blocks when ``request_finished`` returns False; the connector
ends its server request (its shares go) when no copy of it can still need them or its shares:

- **Fenced** (:meth:`RequestEnds.fence`): a copy may still use the request's blocks -- a load in
  a step that may still be in flight (one of the last ``max_in_flight`` steps: vLLM's
  ``max_concurrent_batches``, more than one under async scheduling or pipeline parallelism), or
  an asynchronous store planned since its last preemption (a worker may read its blocks after
  the step that planned it). ``request_finished`` returns True (vLLM keeps the blocks), the next
  plan names the request in ``released``, every worker reports it (``finished_sending``) once its
  copies of it are done with the blocks, and then it ends. So a load is never starved of its
  shares by an abort, no block of a finished request is reported invalid after vLLM gave it
  away, and no store reads a block vLLM gave to another request. (With one step in flight the
  latest step's load is fenced too, although vLLM has always run it by then: one rule for every
  schedule, at the cost of holding such a request's blocks one step longer.)
- **After an asynchronous load** (:meth:`RequestEnds.after_load`): the request waits in vLLM
  (WAITING_FOR_REMOTE_KVS) for its load; vLLM itself keeps the blocks of such a request that
  finishes first (``request_finished`` returns False) until every worker reports the load
  (``finished_recving``); then it ends.

The planner decides which (:meth:`.planner.SchedulerPlanner.finished`) and ends what comes back
from :meth:`RequestEnds.workers_done` / :meth:`RequestEnds.loads_done`. A preempted request's
stores are fenced by its workers instead (the plan's ``preempted``: they wait before the
forward that may overwrite its blocks).
"""


from __future__ import annotations

from typing import Generic, Sequence, TypeVar

R = TypeVar("R")


class RequestEnds(Generic[R]):
    """Finished requests (the planner's books ``R``) not ended on the server yet."""

    def __init__(self) -> None:
        self._fenced: dict[str, R] = {}  # vLLM keeps their blocks until the workers' word
        self._after_load: dict[str, R] = {}  # ended once their asynchronous load is reported
        self._release: set[str] = set()  # fenced, not named in a plan yet

    def __len__(self) -> int:
        return len(self._fenced) + len(self._after_load)

    def fence(self, request_id: str, req: R) -> None:
        self._fenced[request_id] = req
        self._release.add(request_id)

    def after_load(self, request_id: str, req: R) -> None:
        self._after_load[request_id] = req

    def take_released(self) -> list[str]:
        """The fenced requests to name in the next plan's ``released`` (each once)."""
        released = sorted(self._release)
        self._release.clear()
        return released

    def workers_done(self, request_ids: Sequence[str]) -> list[R]:
        """Fenced requests every worker reported (``finished_sending``): to end now."""
        return [req for r in request_ids if (req := self._fenced.pop(r, None)) is not None]

    def loads_done(self, request_ids: Sequence[str]) -> list[R]:
        """Requests whose asynchronous load every worker reported (``finished_recving``) and
        that finished meanwhile: to end now."""
        return [req for r in request_ids if (req := self._after_load.pop(r, None)) is not None]

    def drain(self) -> list[R]:
        """Everything not ended yet (engine shutdown)."""
        out = [*self._fenced.values(), *self._after_load.values()]
        self._fenced.clear()
        self._after_load.clear()
        self._release.clear()
        return out
