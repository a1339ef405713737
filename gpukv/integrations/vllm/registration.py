"""A worker's registration with ``gpukv serve``: vLLM's own KV tensors described to the server, and
the registration kept alive across server restarts (nothing here imports vLLM).

- **Registration fails closed.** A layout gpukv cannot map, or a server that refuses the worker
  (no arena for its GPU, a layout that differs from the model's), leaves the worker uncached for
  good, logged once; a server that does not answer or is busy is asked again later (backing off
  from ``RETRY_MIN_S`` to ``RETRY_MAX_S``). Unregistered, the worker stores nothing and reports
  every planned load failed; the scheduler's lookups count no chunk for an engine whose workers
  are not all registered, so such loads are not planned in the first place.
- **A server restart heals.** When a call is refused because the server forgot this worker (it
  restarted, or reaped this process's session: :attr:`.guard.GuardedClient.lost`), or a PING
  every ``probe_s`` shows another server process, the worker registers again (same backoff,
  logged once per incident). A server that comes back with another chunk size or salt cannot
  serve this engine's plans: the worker stays uncached until the engine restarts. The probes
  and re-registrations run on a side thread (:meth:`Registration.heal`), one at a time: a
  silent server never holds up an engine step.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from typing import Any, Callable, Mapping

import torch

from gpukv.errors import Busy
from gpukv.frontend.client import ServerError, ServerUnavailable
from gpukv.integrations.vllm.layouts import kv_views

log = logging.getLogger(__name__)

PROBE_S = 10.0
PROBE_TIMEOUT_S = 0.2
RETRY_MIN_S, RETRY_MAX_S = 1.0, 60.0
_TRANSIENT = (ServerUnavailable, Busy, ServerError)


class Registration:
    """One worker instance's registration. ``client``: the ``CacheClient`` API (register,
    unregister, ping) plus :class:`.guard.GuardedClient`'s ``take_lost`` and ``down``."""

    def __init__(self, client: Any, *, instance_id: str, model: str, tp_rank: int, tp_size: int,
                 probe_s: float = PROBE_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.client, self.instance_id, self.model = client, instance_id, model
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.probe_s, self._clock = probe_s, clock
        self.kind: str | None = None  # the layout kind, once vLLM's tensors are mapped
        self.registered = False
        self.refused: str | None = None  # why this worker runs uncached for good
        self.views: dict[str, torch.Tensor] | None = None
        self.layer_index: dict[str, int] = {}  # vLLM's layer name -> its index in the chunks
        self.dims = ""
        self._server_pid = None
        self._retry_at = float("inf")
        self._backoff = RETRY_MIN_S
        self._next_probe = 0.0
        self._incident = False  # a registration problem was logged and is not healed yet
        self._check: Future | None = None  # the server check in flight (see heal)
        self.num_registrations = 0

    def register(self, kv_caches: Mapping[str, torch.Tensor], backend: str) -> bool:
        """Register vLLM's own tensors (views of them) with the server; whether it is registered
        now (if not, the worker runs uncached: see the module docstring)."""
        if self.views is not None:
            raise ValueError(f"instance {self.instance_id!r} already has its KV tensors")
        try:
            self.views, self.dims, self.kind = kv_views(kv_caches, backend)
        except (ValueError, TypeError) as exc:
            self.refuse(str(exc))
            return False
        self.layer_index = {name: i for i, name in enumerate(self.views)}
        self._server_pid = self.client.server_info.get("pid")
        return self._register()

    def _register(self) -> bool:
        try:
            self.client.register(self.instance_id, self.model, self.views, self.dims, kind=self.kind,
                                 tp_rank=self.tp_rank, tp_size=self.tp_size)
        except _TRANSIENT as exc:
            self._retry_later(f"registering {self.instance_id} failed ({type(exc).__name__}: {exc})")
            return False
        except ValueError as exc:
            if "already registered" not in str(exc):  # the server refuses this worker
                self.refuse(f"the server refused the registration: {exc}")
                return False
        self.registered, self._retry_at, self._backoff = True, float("inf"), RETRY_MIN_S
        self.num_registrations += 1
        if self._incident:
            log.warning("gpukv: %s registered again; caching resumes", self.instance_id)
            self._incident = False
        return True

    def _retry_later(self, why: str) -> None:
        self._retry_at = self._clock() + self._backoff
        if not self._incident:
            log.warning("gpukv: %s; running uncached, trying again (backing off up to %.0f s)",
                        why, RETRY_MAX_S)
        self._incident, self._backoff = True, min(RETRY_MAX_S, self._backoff * 2)

    def refuse(self, reason: str) -> None:
        """Run uncached for good (logged once, naming ``reason``)."""
        self.refused, self.registered = reason, False
        log.error("gpukv: %s; worker %s runs uncached", reason, self.instance_id)

    def heal(self, background: Callable[..., Future]) -> None:
        """Notice a server that forgot this worker, and register again when it is time. The
        server calls (a PING, a registration) run through ``background`` (a thread of their
        own: one check at a time), so a silent server never holds up a step."""
        if self.refused is not None or self.views is None:
            return
        if self._check is not None and not self._check.done():
            return
        now = self._clock()
        lost = self.client.take_lost()
        probe = self.registered and not lost and now >= self._next_probe and not self.client.down
        if probe:
            self._next_probe = now + self.probe_s
        if lost and self.registered:
            self._forgotten(now)
        if probe or (not self.registered and now >= self._retry_at):
            self._check = background(self._check_server, now, probe)

    def _forgotten(self, now: float) -> None:
        self.registered, self._retry_at = False, now
        if not self._incident:
            log.warning("gpukv: the server forgot %s (it restarted, or reaped this process's "
                        "session); registering again", self.instance_id)
            self._incident = True

    def _check_server(self, now: float, probe: bool) -> None:
        info = None
        if probe:
            info = self.client.ping(timeout_s=PROBE_TIMEOUT_S)
            if info is not None and info.get("pid") != self._server_pid and self.registered:
                self._forgotten(now)
            if self.registered:
                return
        info = info or self.client.ping(timeout_s=PROBE_TIMEOUT_S)  # the server to register with
        if info is None:
            self._retry_later(f"the server does not answer {self.instance_id}'s PING")
        elif (info.get("chunk_size"), info.get("salt")) != (self.client.chunk_size,
                                                            self.client.server_info.get("salt")):
            self.refuse(f"the server restarted with chunk size {info.get('chunk_size')} (this engine "
                        f"plans for {self.client.chunk_size}) or another salt")
        else:
            self._server_pid = info.get("pid")
            self._register()

    def close(self) -> None:
        if self.registered:
            self.client.unregister(self.instance_id)
            self.registered = False
