"""The scheduler side's calls to the server, and how long one engine step may wait for them.

vLLM's scheduler runs the connector's hooks inline: a lookup that waits for a stalled server
stalls every request of the engine. So the scheduler's calls (lookup, free, end) run in order on
one background thread, and the scheduler waits for answers at most ``budget_s`` per engine step
in all: the budget is the time spent waiting (:meth:`ServerCalls.wait`), not the wall time, so
the forward between a step's lookups and its ends spends none of it; :meth:`ServerCalls.new_step`
starts the next step's budget (the planner calls it at a step's first lookup). An
answer that is not there in time is asked for again at the next step (the call keeps running;
vLLM's "ask again later"), or given up on by the planner; a call whose answer nobody waits for
(free, end) simply runs later, still in order after the lookups sent before it (:meth:`ServerCalls.settle` still waits for them
within the budget, so with a healthy server a request's end has run when its hook returns).

``inline=True`` runs each call at once in the caller's thread (tests, and a planner without a
budget): the answers are then always there.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from typing import Any, Callable, Sequence

log = logging.getLogger(__name__)


class ServerCalls:
    """Calls run in submission order; ``budget_s``: the most one step waits for answers."""

    def __init__(self, budget_s: float = 0.02, *, inline: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if isinstance(budget_s, bool) or not isinstance(budget_s, (int, float)) or budget_s < 0:
            raise ValueError(f"budget_s must be a non-negative number, got {budget_s!r}")
        self.budget_s, self.inline, self._clock = float(budget_s), inline, clock
        self._pool = None if inline else ThreadPoolExecutor(1, thread_name_prefix="gpukv-scheduler")
        self._spent = 0.0  # seconds this step waited so far
        self.num_late = 0  # waits that ran out of budget

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        """Run ``fn(*args, **kwargs)`` after every call submitted before it; its result (or
        exception) comes through :meth:`wait`."""
        if self._pool is not None:
            return self._pool.submit(fn, *args, **kwargs)
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:  # handed to whoever waits for the result
            future.set_exception(exc)
        return future

    def send(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        """Like :meth:`submit` for a call whose result nobody reads: an exception it raises (a
        bug: the guarded client turns the server's failures into fallbacks) is logged."""
        future = self.submit(fn, *args, **kwargs)
        future.add_done_callback(_log_failure)
        return future

    def settle(self, futures: Sequence[Future]) -> bool:
        """Wait for sent calls within what is left of the step's budget (so a healthy server has
        run them when the hook returns); whether they completed. Never raises."""
        return self.wait(futures, results=False) is not None

    def wait(self, futures: Sequence[Future], *, results: bool = True) -> list[Any] | None:
        """The results of ``futures`` if they all complete within what is left of this step's
        budget (``budget_s`` less the time this step's waits took so far), else None (they keep
        running). A call that raised raises here."""
        if not all(f.done() for f in futures):
            t0 = self._clock()
            done, _ = wait_all(futures, timeout=max(0.0, self.budget_s - self._spent))
            self._spent += max(0.0, self._clock() - t0)
            if len(done) < len(futures):
                self.num_late += 1
                return None
        return [f.result() for f in futures] if results else []

    def new_step(self) -> None:
        """A new engine step: its waits get the whole budget again."""
        self._spent = 0.0

    def close(self, timeout_s: float = 5.0) -> None:
        """Let the queued calls (ends of requests) run for up to ``timeout_s``, then drop the rest."""
        if self._pool is None:
            return
        marker = self._pool.submit(lambda: None)
        wait_all([marker], timeout=timeout_s)
        self._pool.shutdown(wait=False, cancel_futures=True)


def _log_failure(future: Future) -> None:
    exc = None if future.cancelled() else future.exception()
    if exc is not None:
        log.error("gpukv: a scheduler call raised", exc_info=exc)
