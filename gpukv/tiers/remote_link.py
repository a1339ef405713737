"""The remote tier's link to its server: up/down state, the probe thread, budgeted round trips.

The first fault (a connection error, a socket timeout, a round trip past its time budget) marks
the server down: callers then answer "miss" at once and never wait on its sockets. Only the probe
thread talks to a down server: it PINGs with back-off (``BACKOFF_MIN_S`` doubling to
``BACKOFF_MAX_S``) until one answers, e.g. after a restart, and marks it up again.

``round_trip`` runs one pipeline of single-key commands on a small pool of call threads and waits
at most ``budget_s`` for the whole answer; an answer past the budget is abandoned (its bytes are
dropped when they arrive, the thread is free again after at most the socket timeout).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from gpukv.tiers.ratelimit import RateLimitedLog

log = logging.getLogger(__name__)

BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 2.0
CALL_THREADS = 4  # concurrent budgeted round trips (abandoned ones included)


class RemoteLink:
    """A redis-py client (``client``), its ``connected`` flag, one daemon probe thread and the
    call threads of budgeted round trips; thread-safe."""

    def __init__(self, client: Any, url: str, *,
                 down_errors: tuple[type[BaseException], ...]) -> None:
        """``client.ping()`` raises one of ``down_errors`` while the server is unavailable."""
        self.client = client
        self._url = url
        self._down_errors = down_errors
        self._warn = RateLimitedLog(log, f"remote tier {url}: ")
        self._lock = threading.Lock()
        self._connected = True
        self._counts = dict(skipped=0, timeouts=0, faults=0)
        self._calls = ThreadPoolExecutor(CALL_THREADS, thread_name_prefix="gpukv-remote-call")
        self._generation = 0  # bumped by every mark_down: a probe older than it does not count
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gpukv-remote-probe", daemon=True)
        self._thread.start()

    @property
    def connected(self) -> bool:
        return self._connected

    def round_trip(self, commands: list[tuple[str, str]], budget_s: float) -> list | None:
        """Replies of single-key ``commands`` (e.g. ``("get", name)``) sent in one pipeline, or
        None when the server is down (counted in ``skipped``), faults (``faults``) or has not
        answered within ``budget_s`` (``timeouts``; it is then marked down)."""
        if not self._connected:
            self._count("skipped")
            return None
        future = self._calls.submit(self._execute, commands)
        try:
            return future.result(timeout=budget_s)
        except FutureTimeout:
            future.cancel()  # not started yet: never sent; else its answer is dropped
            self._count("timeouts")
            self.mark_down(TimeoutError(f"no answer within the {budget_s:g} s budget"))
            return None
        except self._down_errors as exc:
            self.mark_down(exc)
            return None

    def stats(self) -> dict[str, int]:
        """``skipped`` (calls answered at once while down), ``timeouts``, ``faults`` (each
        mark_down)."""
        with self._lock:
            return dict(self._counts)

    def mark_down(self, exc: BaseException) -> bool:
        """Mark the server down because of ``exc`` (counted in ``faults``); True if it was up."""
        with self._lock:
            self._counts["faults"] += 1
            was_up = self._connected
            self._connected = False
            self._generation += 1
        if was_up:
            log.warning("remote tier %s unavailable (%s: %s); lookups miss and stores drop "
                        "until it answers again", self._url, type(exc).__name__, exc)
        self._wake.set()
        return was_up

    def close(self, timeout_s: float | None = None) -> None:
        """Stop the probe thread and the call threads, then disconnect the client."""
        self._closing.set()
        self._wake.set()
        self._thread.join(timeout_s)
        self._calls.shutdown(wait=False, cancel_futures=True)
        self.client.close()

    def _execute(self, commands: list[tuple[str, str]]) -> list:
        pipe = self.client.pipeline(transaction=False)
        for command, name in commands:
            getattr(pipe, command)(name)
        return pipe.execute(raise_on_error=False)

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def _loop(self) -> None:
        backoff = BACKOFF_MIN_S
        while True:
            self._wake.wait()
            if self._closing.wait(backoff):
                return
            with self._lock:
                self._wake.clear()
                generation = self._generation
                if self._connected:
                    continue
            if self._probe():
                with self._lock:
                    if generation == self._generation:  # no new fault during the PING
                        self._connected = True
                    else:
                        self._wake.set()
                if self._connected:
                    log.warning("remote tier %s reconnected", self._url)
                backoff = BACKOFF_MIN_S
            else:
                self._wake.set()
                backoff = min(2 * backoff, BACKOFF_MAX_S)

    def _probe(self) -> bool:
        try:
            self.client.ping()
        except self._down_errors:
            return False
        except Exception as exc:  # e.g. NOAUTH after a restart: stay down, keep probing
            self._warn.warning("probe", f"probe failed ({type(exc).__name__}: {exc})")
            return False
        return True
