"""Up/down state of the remote server, and the thread that probes it while it is down.

The first fault (a connection error, a socket timeout, a lookup past its time budget) marks the
server down: callers then answer "miss" at once and never wait on its sockets. Only the probe
thread talks to a down server: it PINGs with back-off (``BACKOFF_MIN_S`` doubling to
``BACKOFF_MAX_S``) until one answers, e.g. after a restart, and marks it up again.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from gpukv.tiers.ratelimit import RateLimitedLog

log = logging.getLogger(__name__)

BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 2.0


class RemoteHealth:
    """``connected`` flag plus one daemon probe thread; thread-safe."""

    def __init__(self, ping: Callable[[], object], url: str, *,
                 down_errors: tuple[type[BaseException], ...]) -> None:
        """``ping()`` raises one of ``down_errors`` while the server is unavailable."""
        self._ping = ping
        self._url = url
        self._down_errors = down_errors
        self._warn = RateLimitedLog(log, f"remote tier {url}: ")
        self._lock = threading.Lock()
        self._connected = True
        self._generation = 0  # bumped by every mark_down: a probe older than it does not count
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gpukv-remote-probe", daemon=True)
        self._thread.start()

    @property
    def connected(self) -> bool:
        return self._connected

    def mark_down(self, exc: BaseException) -> bool:
        """Mark the server down because of ``exc``; True if it was up until now."""
        with self._lock:
            was_up = self._connected
            self._connected = False
            self._generation += 1
        if was_up:
            log.warning("remote tier %s unavailable (%s: %s); lookups miss and stores drop "
                        "until it answers again", self._url, type(exc).__name__, exc)
        self._wake.set()
        return was_up

    def close(self, timeout_s: float | None = None) -> None:
        self._closing.set()
        self._wake.set()
        self._thread.join(timeout_s)

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
            self._ping()
        except self._down_errors:
            return False
        except Exception as exc:  # e.g. NOAUTH after a restart: stay down, keep probing
            self._warn.warning("probe", f"probe failed ({type(exc).__name__}: {exc})")
            return False
        return True
