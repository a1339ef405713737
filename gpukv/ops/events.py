"""KV events: every object that becomes readable in a tier (:class:`KvStored`) and every object
removed from one (:class:`KvRemoved`), as typed msgpack (msgspec; never pickle).

One event covers one call's objects of one tier, model and kv_rank (``chunk_hashes``, in prompt
order). Events carry ``seq``, consecutive from 0 within ``epoch`` (the publisher's start time in
ns, new for every process), so a subscriber that misses one (a slow subscriber past the socket's
high-water mark, a full queue here, a late join) sees a gap and knows its state is incomplete.

:class:`EventPublisher` is called from any thread and never blocks: an event is numbered and
appended to a bounded queue under one lock (dropped and counted when full) and one thread sends
the queue on a ZMQ XPUB socket (``ipc://`` in a trusted folder, or ``tcp://`` with CURVE: no
other local user may subscribe; the ``--events ADDRESS``).
An optional bounded in-process buffer keeps the same events for :meth:`EventPublisher.take_events`
(what a vLLM connector drains). Wire: one frame per event, ``msgpack(KvStored | KvRemoved)``,
tagged by its ``type`` field (``"stored"`` / ``"removed"``).

Reasons. Stored: ``new`` (written and committed), ``loaded`` (copied up from a lower tier),
``restart`` (found in a tier at start-up, e.g. the disk tier's files). Removed: ``evicted``,
``expired`` (a lease or a TTL ran out), ``cleared`` (an operator's clear), ``corrupt`` (failed
its checksum), ``tier_error`` (dropped after a tier failure), ``deleted`` (removed on request),
``released`` (a temporary L1 copy freed after its last reader). An unfinished write that is
discarded never became readable and has no event.
"""

from __future__ import annotations

import collections
import threading
import time
from pathlib import Path
from typing import Callable, Literal, Sequence, Union

import msgspec
import zmq

from gpukv.constants import HASH_BYTES
from gpukv.curve_keys import CurveServer
from gpukv.ops.event_socket import open_pub, subscription_delta
from gpukv.zmq_context import OwnedContext

TIERS = ("L1", "disk", "remote")
STORED_REASONS = ("new", "loaded", "restart")
REMOVED_REASONS = ("evicted", "expired", "cleared", "corrupt", "tier_error", "deleted", "released")
Tier = Literal["L1", "disk", "remote"]
EventKey = tuple[str, int, bytes]  # (model, kv_rank, chunk_hash)


class KvStored(msgspec.Struct, frozen=True, tag="stored", tag_field="type"):
    """``chunk_hashes`` became readable in ``tier`` for (``model``, ``kv_rank``)."""

    seq: int
    epoch: int
    ts: float  # time.time() of the event
    tier: Tier
    model: str
    kv_rank: int
    chunk_hashes: list[bytes]
    reason: Literal["new", "loaded", "restart"]

    def keys(self) -> list[EventKey]:
        return [(self.model, self.kv_rank, h) for h in self.chunk_hashes]


class KvRemoved(msgspec.Struct, frozen=True, tag="removed", tag_field="type"):
    """``chunk_hashes`` are no longer readable in ``tier`` for (``model``, ``kv_rank``)."""

    seq: int
    epoch: int
    ts: float
    tier: Tier
    model: str
    kv_rank: int
    chunk_hashes: list[bytes]
    reason: Literal["evicted", "expired", "cleared", "corrupt", "tier_error", "deleted", "released"]

    def keys(self) -> list[EventKey]:
        return [(self.model, self.kv_rank, h) for h in self.chunk_hashes]


KvEvent = Union[KvStored, KvRemoved]
_ENCODER = msgspec.msgpack.Encoder()


def encode_event(event: KvEvent) -> bytes:
    return _ENCODER.encode(event)


def decode_event(payload: bytes) -> KvEvent:
    """One wire frame back to its event; ``ValueError`` when it is not a valid event."""
    try:
        return _DECODER.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ValueError(f"not a gpukv KV event ({len(payload)} bytes): {exc}") from None


_DECODER = msgspec.msgpack.Decoder(KvEvent)


def _check(tier: str, model: str, kv_rank: int, hashes: Sequence[bytes]) -> list[bytes]:
    if tier not in TIERS:
        raise ValueError(f"tier must be one of {', '.join(TIERS)}; got {tier!r}")
    if not isinstance(model, str) or not model:
        raise ValueError(f"model must be a non-empty str, got {model!r}")
    if kv_rank.__class__ is not int or kv_rank < 0:
        raise ValueError(f"kv_rank must be an int >= 0, got {kv_rank!r}")
    if not isinstance(hashes, (list, tuple)):
        raise TypeError(f"chunk_hashes must be a list of bytes, got {type(hashes).__name__}")
    for h in hashes:
        if h.__class__ is not bytes or len(h) != HASH_BYTES:
            raise ValueError(f"chunk hashes must be {HASH_BYTES}-byte bytes, got {h!r:.60}")
    return list(hashes)


class EventPublisher:
    """Numbers KV events and publishes them; any thread may call :meth:`stored` / :meth:`removed`.

    ``address``: ZMQ bind address (``None``: no socket, e.g. a connector that only drains
    :meth:`take_events`): ``ipc://`` in a trusted folder (the socket 0600), or ``tcp://`` with
    CURVE (only holders of the key file ``key_file``, default :func:`gpukv.curve_keys.key_file`,
    may subscribe). ``queue_size`` bounds the events waiting for the socket thread;
    ``buffer_size`` (0 = off) bounds the in-process buffer. ``clock`` gives the ``ts`` field.
    ``listener(event)`` sees every event in seq order, under the publisher's lock (it must only
    enqueue: :class:`gpukv.ops.router_events.RouterEvents` does).
    """

    def __init__(self, address: str | None = None, *, allow_remote: bool = False,
                 queue_size: int = 65536, buffer_size: int = 0, sndhwm: int = 100_000,
                 clock: Callable[[], float] = time.time, key_file: str | None = None,
                 listener: Callable[[KvEvent], None] | None = None) -> None:
        for name, value, low in (("queue_size", queue_size, 1), ("buffer_size", buffer_size, 0),
                                 ("sndhwm", sndhwm, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.epoch = time.time_ns()
        self.queue_size, self.buffer_size = queue_size, buffer_size
        self._listener = listener
        self._clock = clock
        self._cond = threading.Condition()
        self._queue: collections.deque[KvEvent] = collections.deque()
        self._buffer: collections.deque[KvEvent] = collections.deque()
        self._next_seq = 0
        self._closing = False
        self.dropped_queue = 0  # events the socket thread never got (queue full)
        self.dropped_buffer = 0  # events take_events() never got (buffer full)
        self.sent = 0
        self._subscriptions = 0
        self._sending = False  # the socket thread holds a batch it has not sent yet
        self.address: str | None = None
        self._thread: threading.Thread | None = None
        self._curve: CurveServer | None = None
        if address is not None:
            self._zmq = OwnedContext(self)  # closed even if a failed bind drops this unclosed
            try:
                self._sock, self._curve, self.address = open_pub(
                    self._zmq, address, allow_remote=allow_remote, key_file=key_file, sndhwm=sndhwm)
            except (zmq.ZMQError, ValueError):
                self._zmq.close()
                raise
            self._thread = threading.Thread(target=self._run, name="gpukv-events", daemon=True)
            self._thread.start()

    # ---- the callers' side -----------------------------------------------------------------
    def stored(self, tier: str, model: str, kv_rank: int, chunk_hashes: Sequence[bytes],
               reason: str = "new") -> int | None:
        """``chunk_hashes`` became readable in ``tier``; returns the event's seq (``None`` for
        an empty list: no event)."""
        if reason not in STORED_REASONS:
            raise ValueError(f"stored reason must be one of {', '.join(STORED_REASONS)}; "
                             f"got {reason!r}")
        return self._publish(KvStored, tier, model, kv_rank, chunk_hashes, reason)

    def removed(self, tier: str, model: str, kv_rank: int, chunk_hashes: Sequence[bytes],
                reason: str) -> int | None:
        """``chunk_hashes`` were removed from ``tier``; returns the seq (``None``: no event)."""
        if reason not in REMOVED_REASONS:
            raise ValueError(f"removed reason must be one of {', '.join(REMOVED_REASONS)}; "
                             f"got {reason!r}")
        return self._publish(KvRemoved, tier, model, kv_rank, chunk_hashes, reason)

    def _publish(self, cls, tier, model, kv_rank, chunk_hashes, reason) -> int | None:
        hashes = _check(tier, model, kv_rank, chunk_hashes)
        if not hashes:
            return None
        ts = self._clock()
        with self._cond:
            if self._closing:
                raise RuntimeError("EventPublisher is closed")
            seq = self._next_seq
            self._next_seq += 1
            event = cls(seq, self.epoch, ts, tier, model, kv_rank, hashes, reason)
            if self._listener is not None:
                self._listener(event)
            if self._thread is not None:
                if len(self._queue) < self.queue_size:
                    self._queue.append(event)
                    self._cond.notify()
                else:
                    self.dropped_queue += 1
            if self.buffer_size:
                if len(self._buffer) < self.buffer_size:
                    self._buffer.append(event)
                else:
                    self.dropped_buffer += 1
        return seq

    def take_events(self) -> list[KvEvent]:
        """Drain the in-process buffer (oldest first); empty when ``buffer_size`` is 0."""
        with self._cond:
            out = list(self._buffer)
            self._buffer.clear()
        return out

    @property
    def next_seq(self) -> int:
        with self._cond:
            return self._next_seq

    @property
    def subscriptions(self) -> int:
        """Live subscriptions the socket has seen (a SUB subscribing to everything counts 1)."""
        with self._cond:
            return self._subscriptions

    def wait_for_subscribers(self, count: int = 1, timeout_s: float = 5.0) -> bool:
        """Wait until ``count`` subscriptions are live (ZMQ drops what PUB sends before a SUB
        has subscribed); False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._subscriptions < count:
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None:
                    return False
                self._cond.wait(min(left, 0.05))
            return True

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until the socket thread has sent every queued event; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._queue or self._sending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
            return True

    # ---- the socket thread -----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._queue and not self._closing:
                    self._cond.wait(0.05)  # also the period of the subscription check
                batch = list(self._queue)
                self._queue.clear()
                self._sending = bool(batch)
                closing = self._closing
            sock = self._sock  # read each round, after the wait: a test may wrap it
            for event in batch:
                sock.send(_ENCODER.encode(event), zmq.NOBLOCK)  # PUB never blocks: drops at HWM
            delta = subscription_delta(sock)
            with self._cond:
                self.sent += len(batch)
                self._subscriptions += delta
                self._sending = False
                self._cond.notify_all()
                if closing and not self._queue:
                    break
        self._zmq.close_socket(self._sock, linger=1000)  # lets the last events out
        if self._curve is not None:
            self._curve.stop()  # its ZAP sockets live in the context too
        self._zmq.close()

    def close(self, timeout_s: float = 5.0) -> None:
        """Send what is queued, then close the socket (idempotent)."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self.address is not None and self.address.startswith("ipc://"):
            Path(self.address[len("ipc://"):]).unlink(missing_ok=True)

    def __enter__(self) -> "EventPublisher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
