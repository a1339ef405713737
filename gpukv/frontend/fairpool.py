"""A thread pool that serves its clients in turn: one queue per session, taken round robin, and
the bound on what one session may have waiting in it.

A plain FIFO pool lets one client that pipelines many long requests (up to its per-session bound)
put every other client's request behind all of them. Here each thread takes the oldest request of
the next session in turn, so another client waits for at most one request per busy session
already running, whatever their backlogs. :class:`PendingBound` bounds a session's requests
waiting in the pool, in number and bytes (one request always fits), so no session fills memory;
:func:`pooled` says which requests go to the pool at all.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque
from typing import Callable, Hashable

from gpukv.errors import Busy
from gpukv.frontend import protocol as p

log = logging.getLogger(__name__)

INLINE_KEYS = 4096  # objects (hashes x ranks) a request may name and still run in the loop
_POOLED = (p.Stats, p.Flush, p.VllmBlocks)  # VLLM_BLOCKS: large, and never latency-bound


def pooled(body, core) -> bool:
    """Whether a decoded request goes to the pool rather than being answered by the loop: STATS,
    FLUSH, VLLM_BLOCKS, one naming more than ``INLINE_KEYS`` objects, and a LOOKUP that may read a tier."""
    if isinstance(body, _POOLED):
        return True
    hashes = getattr(body, "hashes", None)
    if hashes is None:
        return False
    ranks = body.tp_size if isinstance(body, p.Lookup) else 1
    if len(hashes) * ranks > INLINE_KEYS:
        return True
    return isinstance(body, p.Lookup) and bool(core.tiers) and \
        not core.covered_by_l1(body.model, body.hashes, body.tp_size)  # may read a tier


class PendingBound:
    """Requests and bytes of each session waiting in the pool (thread-safe)."""

    def __init__(self, max_requests: int, max_bytes: int) -> None:
        self.max_requests, self.max_bytes = max_requests, max_bytes
        self._lock = threading.Lock()
        self._pending: dict[Hashable, tuple[int, int]] = {}

    def admit(self, session: Hashable, nbytes: int) -> Busy | None:
        """Count one more request of ``nbytes`` for ``session``, or return the Busy error that
        refuses it (nothing counted)."""
        with self._lock:
            count, held = self._pending.get(session, (0, 0))
            if count >= self.max_requests or (count and held + nbytes > self.max_bytes):
                return Busy(f"busy: {count} requests ({held} bytes) of this client are waiting "
                            f"(at most {self.max_requests}, {self.max_bytes} bytes); retry later")
            self._pending[session] = (count + 1, held + nbytes)
        return None

    def done(self, session: Hashable, nbytes: int) -> None:
        """One admitted request of ``session`` (``nbytes``) left the pool."""
        with self._lock:
            count, held = self._pending.get(session, (1, nbytes))
            if count > 1:
                self._pending[session] = (count - 1, held - nbytes)
            else:
                self._pending.pop(session, None)


class FairPool:
    """``threads`` daemon threads running submitted calls, sessions in turn."""

    def __init__(self, threads: int, *, name: str = "gpukv-pool") -> None:
        self._cond = threading.Condition()
        self._queues: OrderedDict[Hashable, deque] = OrderedDict()  # sessions with work, in turn
        self._stopping = False
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
                         for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, session: Hashable, fn: Callable, *args) -> None:
        """Queue ``fn(*args)`` for ``session`` (after that session's earlier calls)."""
        with self._cond:
            if self._stopping:
                raise RuntimeError("the pool is shut down")
            queue = self._queues.get(session)
            if queue is None:
                queue = self._queues[session] = deque()
            queue.append((fn, args))
            self._cond.notify()

    def shutdown(self, timeout_s: float | None = None) -> int:
        """Drop the calls not started, wait for the running ones; returns how many were dropped."""
        with self._cond:
            self._stopping = True
            dropped = sum(len(q) for q in self._queues.values())
            self._queues.clear()
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout_s)
        return dropped

    def _take(self):
        with self._cond:
            while not self._queues and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            session, queue = next(iter(self._queues.items()))
            call = queue.popleft()
            del self._queues[session]
            if queue:  # its next call waits for every other session's turn
                self._queues[session] = queue
            return call

    def _run(self) -> None:
        while True:
            call = self._take()
            if call is None:
                return
            fn, args = call
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 - a call's own handler answers; this must not die
                log.warning("a pooled call failed outside its handler", exc_info=True)
