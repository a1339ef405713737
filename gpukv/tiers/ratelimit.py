"""Rate-limited warnings: background threads that fail on every item must not flood the log."""

from __future__ import annotations

import logging
import threading
import time

WARN_INTERVAL_S = 5.0


class RateLimitedLog:
    """At most one warning per ``kind`` every ``interval_s``; the next one says how many were
    suppressed in between. Thread-safe."""

    def __init__(self, logger: logging.Logger, prefix: str = "",
                 interval_s: float = WARN_INTERVAL_S) -> None:
        self._log = logger
        self._prefix = prefix
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, kind: str, message: str, *, exc_info: BaseException | None = None) -> bool:
        """Log ``message`` unless a ``kind`` warning was logged less than ``interval_s`` ago.

        Returns True when it was logged. ``exc_info`` adds that exception's traceback.
        """
        now = time.monotonic()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self._interval_s:
                self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
                return False
            self._last[kind] = now
            suppressed = self._suppressed.pop(kind, 0)
        more = f" (+{suppressed} similar suppressed)" if suppressed else ""
        self._log.warning("%s%s%s", self._prefix, message, more, exc_info=exc_info)
        return True
