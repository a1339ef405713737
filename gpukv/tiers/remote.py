"""The shared tier: chunks in Redis / Valkey, so gpukv instances on several machines share them.

``RemoteTier`` sits after L1 and disk. One background thread writes queued stores in batched
``SET`` pipelines; a lookup is one pipelined ``EXISTS`` round trip, a load one of ``GET``.
Values are the ``chunk_codec`` blobs the disk tier writes (format version, key, layout
fingerprint, size, blake2b checksum) under ``f"{namespace}:{key}"``; a value failing its checks
is a miss and is deleted (by the writer thread, off the caller's path).

URLs: redis://, rediss://, unix://, redis+cluster://, valkey[s]:// ... (see ``gpukv.tiers.redis_url``);
the password is masked in every message and log line.

Faults. At construction a bad URL, a wrong password, a server wanting AUTH or an unreachable
server raise ``ValueError`` naming the masked URL (a misconfigured shared tier fails fast).
Afterwards nothing raises to callers. Connect and every socket read/write are bounded by
``timeout_s`` (redis-py retries off). The first ``ConnectionError``/``TimeoutError`` marks the tier
down: lookups then answer "miss" at once and ``submit`` drops (counted; warnings rate-limited), so
a dead or stopped server costs a caller at most one ``timeout_s`` stall. Only the writer thread
talks to a down server: it drops what was queued and PINGs with back-off (50 ms doubling to 2 s)
until one succeeds, e.g. after a restart. ``timeout_s`` bounds lack of progress, not a transfer:
64 chunks of 18 MB take as long as their bytes take.

Recommended server settings (capacity is the server's business; gpukv counts no bytes there)::

    maxmemory <bytes>              # without it Redis grows until the OOM killer
    maxmemory-policy allkeys-lru   # evicted chunks are plain misses (noeviction: SETs fail
                                   # with OOM, counted here as dropped stores)
    save ""  + appendonly no       # a cache needs no persistence (no fork, fast restart)
    proto-max-bulk-len 512mb       # default; one value is one chunk (Llama-8B x 256 tok: 32 MiB)
    client-query-buffer-limit 1gb  # default; one pipeline carries up to batch_size chunks

Valkey speaks the same protocol and takes the same settings (the tests pass against redis-server
7.0 and valkey-server 8.1). Cluster: every command touches one key, so ``RedisCluster`` splits the
pipelines per node (no cross-slot commands, no hash tags). Only a one-node cluster round trip is
tested; fault bounds are tested on standalone servers, and a cluster's topology refresh after a
fail-over may stall longer than ``timeout_s``. Sentinel is not supported.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import redis.exceptions as rexc
import torch

from gpukv.tiers import codec as chunk_codec
from gpukv.tiers.redis_url import DOWN_ERRORS, connect, mask_url

log = logging.getLogger(__name__)

BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 2.0
WARN_INTERVAL_S = 5.0
_COUNTERS = ("stored", "dropped", "hits", "misses", "corrupt", "deleted", "errors", "skipped",
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

    def __init__(self, url: str, *, namespace: str = "gpukv", timeout_s: float = 0.5,
                 queue_size: int = 256, batch_size: int = 16, ttl_s: float | None = None) -> None:
        """Connect to ``url`` and PING it; raises ``ValueError`` (URL masked) if that fails.

        ``timeout_s`` bounds connect and every socket read/write; ``queue_size`` bounds queued
        stores (memory: up to ``queue_size`` chunk payloads); ``batch_size`` is the number of
        writes per pipeline; ``ttl_s`` (optional) expires values, on top of the server's LRU.
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
        self._client = connect(url, self.timeout_s)
        self._queue: queue.Queue[_Op] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._pending = 0  # queued or being written
        self._connected = True
        self._last_warn: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._closing = threading.Event()
        self._writer = threading.Thread(target=self._write_loop, name="gpukv-remote-writer",
                                        daemon=True)
        self._writer.start()

    # ------------------------------------------------------------------ public API
    def submit(self, key: str, fingerprint: str, payload: torch.Tensor) -> bool:
        """Queue one chunk for writing; never blocks. The tier owns ``payload`` from now on.

        ``payload``: 1-D contiguous CPU uint8 tensor. Returns False (counted in ``dropped``,
        rate-limited warning) when the queue is full or the remote is down.
        """
        self._check_open()
        if payload.dtype != torch.uint8 or payload.device.type != "cpu" or payload.dim() != 1:
            raise ValueError(f"payload must be a 1-D CPU uint8 tensor, got {tuple(payload.shape)} "
                             f"{payload.dtype} on {payload.device}")
        if not self._connected:
            self._drop(1, "remote down")
            return False
        with self._lock:
            self._pending += 1
        try:
            self._queue.put_nowait(_Op(self._name(key), key, fingerprint, payload))
        except queue.Full:
            self._finish(1)
            self._drop(1, "queue full")
            return False
        return True

    def contains_many(self, keys: list[str]) -> list[bool]:
        """Which keys the server holds: one pipelined ``EXISTS`` round trip; all False if down."""
        self._check_open()
        if not keys:
            return []
        replies = self._round_trip([("exists", self._name(k)) for k in keys])
        if replies is None:
            return [False] * len(keys)
        return [reply == 1 for reply in replies]

    def load(self, key: str, fingerprint: str, nbytes: int) -> torch.Tensor | None:
        """One chunk (1-D CPU uint8, ``nbytes`` long), or None on a miss, a bad value or a fault."""
        return self.load_many([key], fingerprint, nbytes)[0]

    def load_many(self, keys: list[str], fingerprint: str,
                  nbytes: int) -> list[torch.Tensor | None]:
        """Pipelined ``GET`` + ``chunk_codec.decode``; per key a payload or None (miss).

        A value that fails its checks (corrupted, truncated, foreign fingerprint, other key) is a
        miss, counted in ``corrupt`` and queued for deletion.
        """
        self._check_open()
        if not keys:
            return []
        replies = self._round_trip([("get", self._name(k)) for k in keys])
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
                    self._warn("corrupt", f"bad value for {key!r}: {reason}; deleting it")
                    self._queue_delete(key)
            elif blob is not None:
                self._count(errors=1)
                self._warn("error", f"GET {key!r} failed: {blob}")
            out.append(payload)
            if payload is None:
                self._count(misses=1)
            else:
                self._count(hits=1, bytes_loaded=nbytes)
        return out

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued write has been written or dropped; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout=timeout_s)

    def stats(self) -> dict:
        """Counters (stored, dropped, hits, misses, corrupt, deleted, errors, skipped, bytes_*),
        ``queue_depth``, ``pending`` and ``connected``."""
        with self._lock:
            out: dict = dict(self._counts)
            out["pending"] = self._pending
        out["queue_depth"] = self._queue.qsize()
        out["connected"] = self._connected
        return out

    def close(self) -> None:
        """Stop the writer (queued writes not yet sent are dropped and counted) and disconnect.

        Call ``flush()`` first to keep them. Idempotent.
        """
        if self._closing.is_set():
            return
        self._closing.set()
        self._writer.join()
        self._drop_queued("closing")
        self._client.close()

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

    def _round_trip(self, commands: list[tuple[str, str]]) -> list | None:
        """Run single-key commands in one pipeline; None (counted) if the remote is down."""
        if not self._connected:
            self._count(skipped=1)
            return None
        pipe = self._client.pipeline(transaction=False)
        for command, name in commands:
            getattr(pipe, command)(name)
        try:
            return pipe.execute(raise_on_error=False)
        except DOWN_ERRORS as exc:
            self._mark_down(exc)
            return None

    def _queue_delete(self, key: str) -> None:
        with self._lock:
            self._pending += 1
        try:
            self._queue.put_nowait(_Op(self._name(key), key, "", None))
        except queue.Full:
            self._finish(1)  # the bad value is found (and queued) again on its next load

    def _write_loop(self) -> None:
        backoff = BACKOFF_MIN_S
        while not self._closing.is_set():
            if not self._connected:
                self._drop_queued("remote down")
                if self._closing.wait(backoff):
                    break
                backoff = BACKOFF_MIN_S if self._probe() else min(2 * backoff, BACKOFF_MAX_S)
                continue
            try:
                batch = [self._queue.get(timeout=0.05)]
            except queue.Empty:
                continue
            while len(batch) < self.batch_size:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._write(batch)

    def _write(self, batch: list[_Op]) -> None:
        try:
            pipe = self._client.pipeline(transaction=False)
            for op in batch:
                if op.payload is None:
                    pipe.delete(op.name)
                else:
                    blob = chunk_codec.encode(op.key, op.fingerprint, op.payload)
                    pipe.set(op.name, blob, px=self._ttl_ms)
            try:
                replies = pipe.execute(raise_on_error=False)
            except DOWN_ERRORS as exc:
                self._mark_down(exc)
                self._drop(sum(op.payload is not None for op in batch), "remote down")
                return
            for op, reply in zip(batch, replies):
                if isinstance(reply, rexc.ResponseError):  # e.g. OOM on a noeviction server
                    self._count(errors=1)
                    self._drop(int(op.payload is not None), "refused", f" ({reply})")
                elif op.payload is None:
                    self._count(deleted=int(reply))
                else:
                    self._count(stored=1, bytes_stored=op.payload.numel())
        finally:
            self._finish(len(batch))

    def _probe(self) -> bool:
        try:
            self._client.ping()
        except DOWN_ERRORS:
            return False
        self._connected = True
        log.warning("remote tier %s reconnected", self.url)
        return True

    def _mark_down(self, exc: Exception) -> None:
        self._count(errors=1)
        if self._connected:
            self._connected = False
            log.warning("remote tier %s unavailable (%s: %s); lookups miss and stores drop "
                        "until it answers again", self.url, type(exc).__name__, exc)

    def _drop_queued(self, reason: str) -> None:
        num_ops = num_stores = 0
        while True:
            try:
                op = self._queue.get_nowait()
            except queue.Empty:
                break
            num_ops += 1
            num_stores += op.payload is not None
        if num_ops:
            self._drop(num_stores, reason)
            self._finish(num_ops)

    def _drop(self, num_stores: int, reason: str, detail: str = "") -> None:
        if num_stores:
            self._count(dropped=num_stores)
            self._warn(reason, f"dropped {num_stores} store(s): {reason}{detail}")

    def _finish(self, num_ops: int) -> None:
        with self._idle:
            self._pending -= num_ops
            if self._pending == 0:
                self._idle.notify_all()

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                self._counts[name] += delta

    def _warn(self, kind: str, message: str) -> None:
        """At most one warning per kind every WARN_INTERVAL_S, with the number suppressed."""
        now = time.monotonic()
        with self._lock:
            if now - self._last_warn.get(kind, -WARN_INTERVAL_S) < WARN_INTERVAL_S:
                self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
                return
            self._last_warn[kind] = now
            suppressed = self._suppressed.pop(kind, 0)
        more = f" (+{suppressed} similar suppressed)" if suppressed else ""
        log.warning("remote tier %s: %s%s", self.url, message, more)

