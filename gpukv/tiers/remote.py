"""The shared tier: chunks in Redis / Valkey, so gpukv instances on several machines share them.

``RemoteTier`` sits after L1 and disk. One background writer (``gpukv.tiers.writer``) writes
queued stores in batched ``SET`` pipelines. ``load_many`` fetches a whole run of chunks in one
pipelined ``GET`` round trip (no ``EXISTS`` first) under one time budget; ``contains_many`` (used
by the spill path to skip chunks the server holds) is one pipelined ``EXISTS`` round trip.
Values are the ``chunk_codec`` blobs the disk tier writes (format version, key, layout
fingerprint, size, checksum) under ``f"{namespace}:{key}"``; a value failing its checks
is a miss and is deleted (by the writer thread, off the caller's path).

URLs: see ``gpukv.tiers.redis_url``; the password is masked in every message and log line.

Faults. At construction a bad URL, a wrong password, a server wanting AUTH or an unreachable
server raise ``ValueError`` naming the masked URL (a misconfigured shared tier fails fast).
Afterwards nothing raises to callers. Connect and every socket read/write are bounded by
``timeout_s`` (redis-py retries off), and each ``load_many``/``contains_many`` call as a whole
by its budget (``budget_s``, default ``timeout_s``; see ``gpukv.tiers.remote_link``). Decode
and checksum of what arrived in time come on top (CPU work at GB/s, no waiting). The first
``ConnectionError``/``TimeoutError`` or budget overrun marks the tier down: lookups then answer
"miss" at once and ``submit`` drops (counted; warnings rate-limited), so a dead or slow server
costs a lookup at most one budget. The writer drops what is queued while the server is down;
only the probe thread (``gpukv.tiers.remote_link``) talks to it, PINGing with back-off (50 ms
doubling to 2 s) until one succeeds, e.g. after a restart. For writes ``timeout_s`` bounds lack
of progress, not a transfer (64 chunks of 18 MB take as long as their bytes take); a load's
budget bounds its whole transfer, so the budget must exceed the time the largest run a lookup
fetches takes to arrive, or such lookups miss and mark the tier down. The write queue is
bounded by count (``queue_size``) and by payload bytes (``queue_bytes``); a pipeline carries at
most ``batch_size`` writes and ``batch_bytes`` bytes.

Events (``on_event``, contract in :mod:`gpukv.tiers.events`), all from the writer thread:
"stored"/"written" after a ``SET`` the server acknowledged; "removed"/"corrupt" after a ``DEL`` of
a bad value that deleted it. Not observable here, so never reported: the server's own LRU
evictions, ``ttl_s`` expiries, and writes or deletes by other gpukv instances sharing the server.
A replay thus gives the keys this instance wrote and did not delete, a superset of what the
server still holds; a lookup of an evicted key is a plain miss.

Server settings: README, "Shared tier on Redis / Valkey" (capacity is the server's business).
Valkey speaks the same protocol. Cluster: every command touches one key, so ``RedisCluster``
splits the pipelines per node. Only a one-node cluster round trip is tested; fault bounds are
tested on standalone servers, and a cluster's topology refresh after a fail-over may stall longer
than ``timeout_s``. Sentinel is not supported.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import redis.exceptions as rexc
import torch

from gpukv.tiers import codec as chunk_codec
from gpukv.tiers.events import REMOVED, STORED, EventCallback, TierEvents
from gpukv.tiers.ratelimit import RateLimitedLog
from gpukv.tiers.redis_url import DOWN_ERRORS, connect, mask_url
from gpukv.tiers.remote_link import RemoteLink
from gpukv.tiers.writer import BackgroundWriter

log = logging.getLogger(__name__)

DEFAULT_QUEUE_BYTES = 512 << 20
DEFAULT_BATCH_BYTES = 256 << 20  # well under Redis's default client-query-buffer-limit (1 GiB)
_COUNTERS = ("stored", "dropped", "hits", "misses", "corrupt", "deleted", "errors",
             "bytes_stored", "bytes_loaded")


@dataclass(slots=True)
class _Op:
    """One queued write: SET of an encoded chunk, or DEL of a bad value (``payload is None``)."""

    name: str
    key: str
    fingerprint: str
    payload: torch.Tensor | None


class RemoteTier:
    """Chunks in a Redis-protocol server, shared by gpukv instances on many machines.

    Thread-safe: any number of threads may call ``submit``/``contains_many``/``load_many``.
    """

    name = "remote"
    local_index = False  # contains_many is a round trip (see gpukv.tiers.fetch)

    def __init__(self, url: str, *, namespace: str = "gpukv", timeout_s: float = 0.5,
                 queue_size: int = 256, queue_bytes: int | None = DEFAULT_QUEUE_BYTES,
                 batch_size: int = 16, batch_bytes: int | None = DEFAULT_BATCH_BYTES,
                 ttl_s: float | None = None, on_event: EventCallback | None = None) -> None:
        """Connect to ``url`` and PING it; raises ``ValueError`` (URL masked) if that fails.

        ``timeout_s`` bounds connect and every socket read/write; ``queue_size`` and
        ``queue_bytes`` bound queued writes (count, payload bytes); ``batch_size`` and
        ``batch_bytes`` bound one write pipeline; ``ttl_s`` (optional) expires values, on top of
        the server's LRU; ``on_event(event, key, reason)`` (optional) hears stores and deletes.
        """
        if not isinstance(namespace, str) or not namespace:
            raise ValueError(f"namespace must be a non-empty string, got {namespace!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        if not (isinstance(queue_size, int) and queue_size >= 1):
            raise ValueError(f"queue_size must be an int >= 1, got {queue_size!r}")
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if ttl_s is not None and not ttl_s > 0:
            raise ValueError(f"ttl_s must be None or > 0, got {ttl_s!r}")
        self.url = mask_url(url)
        self.namespace = namespace
        self.timeout_s = float(timeout_s)
        self.batch_size = batch_size
        self._ttl_ms = None if ttl_s is None else max(1, int(ttl_s * 1000))
        self._events = TierEvents(on_event, self.name)
        self._link = RemoteLink(connect(url, self.timeout_s), self.url, down_errors=DOWN_ERRORS)
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._warn = RateLimitedLog(log, f"remote tier {self.url}: ")
        self._closing = threading.Event()
        self._writer = BackgroundWriter(self._write, name="gpukv-remote-writer",
                                        max_items=queue_size, max_bytes=queue_bytes,
                                        batch_size=batch_size, max_batch_bytes=batch_bytes,
                                        on_drop=self._on_drop)

    # ------------------------------------------------------------------ public API
    def submit(self, key: str, fingerprint: str, payload: torch.Tensor) -> bool:
        """Queue one chunk for writing; never blocks. The tier owns ``payload`` from now on.

        ``payload``: 1-D contiguous CPU uint8 tensor. Returns False (counted in ``dropped``,
        rate-limited warning) when the queue is full (by count or bytes) or the remote is down.
        """
        self._check_open()
        if payload.dtype != torch.uint8 or payload.device.type != "cpu" or payload.dim() != 1:
            raise ValueError(f"payload must be a 1-D CPU uint8 tensor, got {tuple(payload.shape)} "
                             f"{payload.dtype} on {payload.device}")
        name = self._name(key)
        if not self._link.connected:
            self._drop(1, "remote down")
            return False
        return self._writer.submit(_Op(name, key, fingerprint, payload), payload.numel())

    def contains_many(self, keys: list[str], *, budget_s: float | None = None) -> list[bool]:
        """Which keys the server holds: one pipelined ``EXISTS`` round trip within ``budget_s``
        (default ``timeout_s``); all False if down or past the budget."""
        self._check_open()
        budget_s = self._budget(budget_s)
        if not keys:
            return []
        replies = self._link.round_trip([("exists", self._name(k)) for k in keys], budget_s)
        if replies is None:
            return [False] * len(keys)
        return [reply == 1 for reply in replies]

    def load(self, key: str, fingerprint: str, nbytes: int) -> torch.Tensor | None:
        """One chunk (1-D CPU uint8, ``nbytes`` long), or None on a miss, a bad value or a fault."""
        return self.load_many([key], fingerprint, nbytes)[0]

    def load_many(self, keys: list[str], fingerprint: str, nbytes: int, *,
                  budget_s: float | None = None) -> list[torch.Tensor | None]:
        """One pipelined ``GET`` round trip for all ``keys`` + ``chunk_codec.decode``; per key a
        payload (1-D CPU uint8, ``nbytes`` long) or None (miss).

        The wait on the server is bounded by ``budget_s`` (default ``timeout_s``) for the whole
        call: past it every key is a miss (counted in ``timeouts``) and the tier is marked down,
        so later calls answer at once while the probe thread waits for the server. A value that
        fails its checks (corrupted, truncated, foreign fingerprint, other key) is a miss, counted
        in ``corrupt`` and queued for deletion.
        """
        self._check_open()
        budget_s = self._budget(budget_s)
        if not keys:
            return []
        replies = self._link.round_trip([("get", self._name(k)) for k in keys], budget_s)
        if replies is None:
            self._count(misses=len(keys))
            return [None] * len(keys)
        out: list[torch.Tensor | None] = []
        for key, blob in zip(keys, replies):
            payload = None
            if isinstance(blob, bytes):
                payload, reason = chunk_codec.decode(blob, key, fingerprint, nbytes)
                if payload is None:
                    self._count(corrupt=1)
                    self._warn.warning("corrupt", f"bad value for {key!r}: {reason}; deleting it")
                    self._queue_delete(key)
            elif blob is not None:
                self._count(errors=1)
                self._warn.warning("error", f"GET {key!r} failed: {blob}")
            out.append(payload)
            if payload is None:
                self._count(misses=1)
            else:
                self._count(hits=1, bytes_loaded=nbytes)
        return out

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every write queued before the call has been written or dropped; False on
        timeout (honoured whatever the queue holds)."""
        return self._writer.flush(timeout_s)

    def stats(self) -> dict:
        """Counters (stored, dropped, hits, misses, corrupt, deleted, errors, skipped, timeouts,
        bytes_stored, bytes_loaded), ``queue_depth``/``queued_bytes`` (waiting writes),
        ``pending`` (waiting or being written), ``connected`` and ``event_errors``."""
        writer = self._writer.stats()
        link = self._link.stats()
        with self._lock:
            out: dict = dict(self._counts)
        out["errors"] += writer["errors"] + link["faults"]
        out["skipped"] = link["skipped"]
        out["timeouts"] = link["timeouts"]
        out["queue_depth"] = writer["queued"]
        out["queued_bytes"] = writer["queued_bytes"]
        out["pending"] = writer["queued"] + writer["in_flight"]
        out["connected"] = self._link.connected
        out["event_errors"] = self._events.errors
        return out

    def close(self, timeout_s: float | None = 10.0) -> bool:
        """Write what is queued for up to ``timeout_s``, drop (and count) the rest, stop the
        threads and disconnect. True when everything was written in time. Idempotent."""
        if self._closing.is_set():
            return True
        flushed = self._writer.flush(timeout_s)
        self._closing.set()
        stopped = self._writer.close(timeout_s)
        self._link.close(timeout_s)
        return flushed and stopped

    def __enter__(self) -> "RemoteTier":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _name(self, key: str) -> str:
        if not isinstance(key, str) or not key:
            raise ValueError(f"key must be a non-empty string, got {key!r}")
        return f"{self.namespace}:{key}"

    def _check_open(self) -> None:
        if self._closing.is_set():
            raise RuntimeError(f"RemoteTier({self.url}) is closed")

    def _budget(self, budget_s: float | None) -> float:
        if budget_s is None:
            return self.timeout_s
        if isinstance(budget_s, bool) or not isinstance(budget_s, (int, float)) or not budget_s > 0:
            raise ValueError(f"budget_s must be a positive number or None, got {budget_s!r}")
        return float(budget_s)

    def _queue_delete(self, key: str) -> None:
        # When the queue is full the bad value is found (and queued) again on its next load.
        self._writer.submit(_Op(self._name(key), key, "", None), 0)

    def _on_drop(self, op: _Op, reason: str) -> None:
        """A queued write the writer refused, failed (``"error"``: counted there) or closed."""
        if op.payload is not None and reason != "error":
            self._drop(1, reason.replace("_", " "))

    def _write(self, batch: list[_Op]) -> None:
        """The writer's handler: one pipeline of SETs (and DELs of bad values)."""
        if not self._link.connected:
            self._drop(sum(op.payload is not None for op in batch), "remote down")
            return
        pipe = self._link.client.pipeline(transaction=False)
        for op in batch:
            if op.payload is None:
                pipe.delete(op.name)
            else:
                blob = chunk_codec.encode(op.key, op.fingerprint, op.payload)
                pipe.set(op.name, blob, px=self._ttl_ms)
        try:
            replies = pipe.execute(raise_on_error=False)
        except DOWN_ERRORS as exc:
            self._link.mark_down(exc)  # counted there, reported in errors
            self._drop(sum(op.payload is not None for op in batch), "remote down")
            return
        for op, reply in zip(batch, replies):
            if isinstance(reply, rexc.ResponseError):  # e.g. OOM on a noeviction server
                self._count(errors=1)
                self._drop(int(op.payload is not None), "refused", f" ({reply})")
            elif op.payload is None:
                self._count(deleted=int(reply))
                if reply == 1:
                    self._events.record(REMOVED, op.key, "corrupt")
            else:
                self._count(stored=1, bytes_stored=op.payload.numel())
                self._events.record(STORED, op.key, "written")
        self._events.deliver()

    def _drop(self, num_stores: int, reason: str, detail: str = "") -> None:
        if num_stores:
            self._count(dropped=num_stores)
            self._warn.warning(reason, f"dropped {num_stores} store(s): {reason}{detail}")

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                self._counts[name] += delta
