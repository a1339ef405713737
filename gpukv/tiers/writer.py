"""One background-writer mechanism for every off-the-hot-path consumer (disk, Redis, spill).

A ``BackgroundWriter`` is a queue bounded by item count *and* by bytes, drained in batches by one
daemon thread that calls ``handler(batch)``. Items are opaque to it. Its promises:

- ``submit`` never blocks. A refused item is counted and handed to ``on_drop(item, reason)`` at
  once (reasons: ``"queue_full"``, ``"bytes_full"``, ``"too_large"``, ``"closed"``).
- Every accepted item is released exactly once: ``on_done(item)`` after its batch's handler
  returned, ``on_drop(item, "error")`` when the handler raised, ``on_drop(item, "closed")`` when
  ``close`` found it still queued. So an owner that pins a resource per item (an L1 share, a
  buffer) releases it in those two callbacks and never in the handler.
- A handler that raises (any ``Exception``) fails its batch only: the exception is logged (rate
  limited, with its traceback), each item of the batch is counted in ``errors`` and released, and
  the thread takes the next batch. The writer cannot know how far a raising handler got, so the
  whole batch counts as failed; handlers that must isolate items use ``batch_size=1`` or handle
  per-item failures themselves. A raising callback is logged and counted in
  ``callback_errors``; it never stops the thread either.
- ``flush(timeout_s)`` waits until every item accepted before the call is released (done,
  failed or dropped), and returns False when ``timeout_s`` passes first, whatever the queue holds.
- ``close(timeout_s)`` drops what is still queued (through ``on_drop``), lets the batch in flight
  finish, and returns whether the thread stopped within ``timeout_s``. Call ``flush`` first to
  keep the queued items.

Bounds apply to queued items; the batch in flight (at most ``batch_size`` items and, when set,
``max_batch_bytes``, or one larger item) comes on top. Callbacks and the handler run without the
writer's lock held. Never call ``flush`` or ``close`` from the handler or a callback.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Callable, Generic, TypeVar

from gpukv.tiers.ratelimit import RateLimitedLog

log = logging.getLogger(__name__)

T = TypeVar("T")


def _check_count(name: str, value: object, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1{' or None' if allow_none else ''}, "
                         f"got {value!r}")


class BackgroundWriter(Generic[T]):
    """A bounded queue of opaque items and one daemon thread handling them in batches."""

    def __init__(self, handler: Callable[[list[T]], None], *, name: str, max_items: int = 256,
                 max_bytes: int | None = None, batch_size: int = 16,
                 max_batch_bytes: int | None = None,
                 on_done: Callable[[T], None] | None = None,
                 on_drop: Callable[[T, str], None] | None = None) -> None:
        """``handler(items)`` handles a batch of 1..``batch_size`` items, in submission order.

        ``max_items``/``max_bytes`` bound what is queued (``nbytes`` as given to ``submit``);
        ``max_batch_bytes`` stops a batch before it would exceed that many bytes (a batch holds at
        least one item). ``name`` names the thread and the log lines.
        """
        if not callable(handler):
            raise TypeError(f"handler must be callable, got {type(handler).__name__}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        _check_count("max_items", max_items)
        _check_count("max_bytes", max_bytes, allow_none=True)
        _check_count("batch_size", batch_size)
        _check_count("max_batch_bytes", max_batch_bytes, allow_none=True)
        for cb_name, cb in (("on_done", on_done), ("on_drop", on_drop)):
            if cb is not None and not callable(cb):
                raise TypeError(f"{cb_name} must be callable or None, got {type(cb).__name__}")
        self.name = name
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.batch_size = batch_size
        self.max_batch_bytes = max_batch_bytes
        self._handler = handler
        self._on_done = on_done
        self._on_drop = on_drop
        self._warn = RateLimitedLog(log, f"{name}: ")
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)      # the thread waits for items
        self._progress = threading.Condition(self._lock)  # flush waits for releases
        self._queue: deque[tuple[int, T, int]] = deque()  # (sequence number, item, nbytes)
        self._queued_bytes = 0
        self._next_seq = 0
        # Lowest sequence numbers still being released outside the lock (None: none).
        self._in_flight: tuple[int, int] | None = None    # (first seq, count) of the batch
        self._releasing: int | None = None                # first seq close() is dropping
        self._counts = dict(done=0, dropped=0, errors=0, callback_errors=0)
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public API
    def submit(self, item: T, nbytes: int) -> bool:
        """Queue ``item`` (``nbytes`` counts against ``max_bytes``); never blocks.

        False: refused, counted in ``dropped``, and already passed to ``on_drop`` (the caller
        must not release it again).
        """
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
            raise ValueError(f"nbytes must be an int >= 0, got {nbytes!r}")
        with self._lock:
            if self._closing:
                reason = "closed"
            elif self.max_bytes is not None and nbytes > self.max_bytes:
                reason = "too_large"
            elif len(self._queue) >= self.max_items:
                reason = "queue_full"
            elif self.max_bytes is not None and self._queued_bytes + nbytes > self.max_bytes:
                reason = "bytes_full"
            else:
                self._queue.append((self._next_seq, item, nbytes))
                self._next_seq += 1
                self._queued_bytes += nbytes
                self._work.notify()
                return True
            self._counts["dropped"] += 1
        self._call(self._on_drop, item, reason)
        return False

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every item accepted before this call is released; False on timeout."""
        if timeout_s is not None and not timeout_s >= 0:
            raise ValueError(f"timeout_s must be >= 0 or None, got {timeout_s!r}")
        with self._lock:
            target = self._next_seq
            return self._progress.wait_for(lambda: self._low_water() >= target, timeout_s)

    def close(self, timeout_s: float | None = None) -> bool:
        """Stop: queued items go to ``on_drop(item, "closed")``; the batch in flight finishes.

        Returns True when the thread has stopped within ``timeout_s``. Idempotent; ``submit``
        refuses (``"closed"``) from now on.
        """
        if timeout_s is not None and not timeout_s >= 0:
            raise ValueError(f"timeout_s must be >= 0 or None, got {timeout_s!r}")
        with self._lock:
            self._closing = True
            dropped = list(self._queue)
            self._queue.clear()
            self._queued_bytes = 0
            if dropped:
                self._releasing = dropped[0][0]
                self._counts["dropped"] += len(dropped)
            self._work.notify_all()
        for _, item, _ in dropped:
            self._call(self._on_drop, item, "closed")
        if dropped:
            with self._lock:
                self._releasing = None
                self._progress.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def stats(self) -> dict[str, int]:
        """``queued``, ``queued_bytes``, ``in_flight`` (items being handled), ``done``,
        ``dropped`` (refused or dropped at close), ``errors`` (items of batches whose handler
        raised) and ``callback_errors``."""
        with self._lock:
            return dict(queued=len(self._queue), queued_bytes=self._queued_bytes,
                        in_flight=0 if self._in_flight is None else self._in_flight[1],
                        **self._counts)

    @property
    def closed(self) -> bool:
        return self._closing

    # ------------------------------------------------------------------ internals
    def _low_water(self) -> int:
        """The lowest sequence number not yet released (``_next_seq`` when all are)."""
        marks = [self._next_seq]
        if self._in_flight is not None:
            marks.append(self._in_flight[0])
        if self._releasing is not None:
            marks.append(self._releasing)
        if self._queue:
            marks.append(self._queue[0][0])
        return min(marks)

    def _take_batch(self) -> list[T]:
        """Pop up to ``batch_size`` items (within ``max_batch_bytes``); the lock is held."""
        first_seq = self._queue[0][0]
        items: list[T] = []
        batch_bytes = 0
        while self._queue and len(items) < self.batch_size:
            _, item, nbytes = self._queue[0]
            if (items and self.max_batch_bytes is not None
                    and batch_bytes + nbytes > self.max_batch_bytes):
                break
            self._queue.popleft()
            items.append(item)
            batch_bytes += nbytes
        self._queued_bytes -= batch_bytes
        self._in_flight = (first_seq, len(items))
        return items

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closing:
                    self._work.wait()
                if self._closing:
                    return  # close() released whatever was queued
                batch = self._take_batch()
            failure: Exception | None = None
            try:
                self._handler(batch)
            except Exception as exc:  # a failing item must not kill the thread
                failure = exc
                self._warn.warning("handler", f"failed on a batch of {len(batch)} item(s) "
                                   f"({type(exc).__name__}: {exc}); they are dropped",
                                   exc_info=exc)
            for item in batch:
                if failure is None:
                    self._call(self._on_done, item)
                else:
                    self._call(self._on_drop, item, "error")
            with self._lock:
                self._counts["done" if failure is None else "errors"] += len(batch)
                self._in_flight = None
                self._progress.notify_all()

    def _call(self, callback: Callable | None, *args: object) -> None:
        if callback is None:
            return
        try:
            callback(*args)
        except Exception as exc:  # an owner's callback bug must not kill the thread either
            with self._lock:
                self._counts["callback_errors"] += 1
            self._warn.warning("callback", f"{getattr(callback, '__name__', 'callback')} "
                               f"raised {type(exc).__name__}: {exc}", exc_info=exc)
