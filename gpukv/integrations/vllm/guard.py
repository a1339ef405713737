"""The connector's calls to ``gpukv serve``, best effort: gpukv is a cache, so a server that does
not answer must cost the engine a miss, never a failed request or a stalled scheduler.

:class:`GuardedClient` has the ``CacheClient`` methods the planner and the worker side use and
the same return values (the data path's ``begin_*_chunks`` / ``finish`` / ``abort`` too: a
begun copy, or None when the server failed the call). When a call fails for a reason the server or its state causes -- no
answer in time (:class:`ServerUnavailable`), a bound (:class:`Busy`), a server-side failure
(:class:`ServerError`), or a refusal because of the server's state (a ``ValueError`` naming an
unknown request or instance: the server restarted, or this process's session was reaped) -- it
returns the "no cache" value (a lookup hits 0 tokens, a retrieve loads 0: the worker reports the
blocks and vLLM recomputes them, a store stores 0), counts it per method, and logs it (the first
one at ERROR, then at most one line per ``LOG_EVERY_S``). After :class:`ServerUnavailable` every
call is skipped for ``retry_s`` (the client's timeout must not stall each step).

A refusal that names this worker's instance as unknown, or its session as reaped, means the server
forgot the worker's registration (it restarted, or reaped this process's session): it sets
:attr:`GuardedClient.lost`, which the worker side reads to register again (:mod:`.worker`).

``register`` is not guarded: the worker side decides what a failed registration means.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Any, Callable

from gpukv.engine.hit_sources import LookupHit
from gpukv.errors import Busy
from gpukv.frontend.client import ServerError, ServerUnavailable

log = logging.getLogger(__name__)

RETRY_S = 30.0
LOG_EVERY_S = 60.0
_SERVER_FAILURES = (ServerUnavailable, Busy, ServerError)
_FORGOTTEN = ("unknown instance", "session was reaped")
_MISS = LookupHit(0, ())


class GuardedClient:
    """Wraps a ``CacheClient`` (or anything with its API). ``failures``: per method, calls that
    returned the fallback because of a failure; ``skipped``: calls not sent (server down)."""

    def __init__(self, client: Any, *, retry_s: float = RETRY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client, self.retry_s, self._clock = client, retry_s, clock
        self.failures: collections.Counter[str] = collections.Counter()
        self.skipped: collections.Counter[str] = collections.Counter()
        self._down_until = float("-inf")
        self._last_log = float("-inf")
        self.lost = False  # the server forgot this process's registration (see the module doc)

    @property
    def chunk_size(self) -> int:
        return self.client.chunk_size

    @property
    def server_info(self) -> dict:
        return self.client.server_info

    @property
    def down(self) -> bool:
        """Whether calls are being skipped now (the server did not answer lately)."""
        return self._clock() < self._down_until

    def take_lost(self) -> bool:
        """Whether the server forgot this process's registration since the last call."""
        lost, self.lost = self.lost, False
        return lost

    def ping(self, *, timeout_s: float) -> dict | None:
        """The server's PING reply, or None if it does not answer within ``timeout_s`` (a probe:
        a slow answer does not pause the other calls)."""
        try:
            return self.client.ping(timeout_s=timeout_s)
        except _SERVER_FAILURES:
            self.failures["ping"] += 1
            return None

    def register(self, *args: Any, **kwargs: Any) -> None:
        self.client.register(*args, **kwargs)

    def unregister(self, instance_id: Any) -> None:
        self._guard("unregister", None, False, self.client.unregister, instance_id)

    def lookup(self, *args: Any, **kwargs: Any) -> int:
        return self._guard("lookup", 0, True, self.client.lookup, *args, **kwargs)

    def lookup_hashes(self, *args: Any, **kwargs: Any) -> int:
        return self._guard("lookup", 0, True, self.client.lookup_hashes, *args, **kwargs)

    def lookup_tiers(self, *args: Any, **kwargs: Any) -> LookupHit:
        return self._guard("lookup", _MISS, True, self.client.lookup_tiers, *args, **kwargs)

    def lookup_hashes_tiers(self, *args: Any, **kwargs: Any) -> LookupHit:
        return self._guard("lookup", _MISS, True, self.client.lookup_hashes_tiers, *args, **kwargs)

    def vllm_blocks(self, *args: Any, **kwargs: Any) -> dict | None:
        return self._guard("vllm_blocks", None, False, self.client.vllm_blocks, *args, **kwargs)

    def read_count(self, *args: Any, **kwargs: Any) -> list[int] | None:
        return self._guard("read_count", None, True, self.client.read_count, *args, **kwargs)

    def retrieve(self, *args: Any, **kwargs: Any) -> int:
        return self._guard("retrieve", 0, True, self.client.retrieve, *args, **kwargs)

    def store(self, *args: Any, **kwargs: Any) -> int:
        return self._guard("store", 0, True, self.client.store, *args, **kwargs)

    def begin_retrieve_chunks(self, *args: Any, **kwargs: Any) -> Any:
        """A begun copy, or None (nothing to load: the server failed the call)."""
        return self._guard("retrieve", None, True, self.client.begin_retrieve_chunks, *args, **kwargs)

    def begin_store_chunks(self, *args: Any, **kwargs: Any) -> Any:
        """A begun copy, or None (nothing to store: the server failed the call)."""
        return self._guard("store", None, True, self.client.begin_store_chunks, *args, **kwargs)

    def copy_layers(self, copy: Any, stop: int | None = None, **kwargs: Any) -> Any:
        """Not guarded: the copy itself runs here, the server is not asked."""
        return self.client.copy_layers(copy, stop, **kwargs)

    def finish(self, copy: Any) -> int:
        """The commit / end of a copy: the tokens stored / loaded, or 0 if the server failed it."""
        return self._guard(copy.op, 0, True, self.client.finish, copy)

    def abort(self, copy: Any) -> None:
        self._guard(copy.op, None, True, self.client.abort, copy)

    def free_lookup_locks(self, *args: Any, **kwargs: Any) -> int:
        return self._guard("free_lookup_locks", 0, False, self.client.free_lookup_locks, *args, **kwargs)

    def end_session(self, request_id: Any) -> None:
        self._guard("end_session", None, False, self.client.end_session, request_id)

    def close(self) -> None:
        self.client.close()

    def _guard(self, name: str, fallback: Any, state_errors: bool, fn: Callable[..., Any],
               *args: Any, **kwargs: Any) -> Any:
        """``state_errors``: also treat a ``ValueError`` as the server's state refusing the call
        (retrieve/store/lookup name requests and instances the server may have forgotten)."""
        now = self._clock()
        if now < self._down_until:
            self.skipped[name] += 1
            return fallback
        caught = _SERVER_FAILURES + ((ValueError,) if state_errors else ())
        try:
            return fn(*args, **kwargs)
        except caught as exc:
            self.failures[name] += 1
            if isinstance(exc, ServerUnavailable):
                self._down_until = now + self.retry_s
            elif isinstance(exc, ValueError) and any(s in str(exc) for s in _FORGOTTEN):
                self.lost = True
            self._log(name, exc, now)
            return fallback

    def _log(self, name: str, exc: BaseException, now: float) -> None:
        if now - self._last_log < LOG_EVERY_S:
            return
        level = logging.ERROR if self._last_log == float("-inf") else logging.WARNING
        self._last_log = now
        total = sum(self.failures.values())
        log.log(level, "gpukv: %s failed (%s: %s); running uncached for it (%d gpukv failures so "
                "far%s)", name, type(exc).__name__, exc, total,
                f"; not asking the server for {self.retry_s:.0f} s" if now < self._down_until else "")
