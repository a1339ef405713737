"""Router-grade KV events: what the node's gpukv holds, as vLLM blocks, in vLLM's wire format
(``gpukv serve --vllm-events ADDRESS``), for routers that follow vLLM engines (llm-d's KV-cache
indexer, Dynamo's router) -- one stream for all the engines of the node, ordered, each block
announced once per tier however many engines stored it.

Two inputs, applied in one order by one thread:

- gpukv's own KV events (:class:`gpukv.ops.events.EventPublisher`'s ``listener``, in seq order):
  which objects ``(model, kv_rank, chunk_hash)`` each tier holds (every object is followed);
- descriptions from vLLM schedulers (``VLLM_BLOCKS``, :mod:`gpukv.frontend.protocol`): per chunk,
  its vLLM block hashes, parent, tokens, LoRA... (a *unit*, :mod:`gpukv.ops.router_blocks`).

A unit is announced in a tier (``BlockStored`` with medium ``gpukv:<tier>``) once it is described
and every object an engine needs to load it is in that tier (each pipeline stage's model, each
KV rank of the TP size); it is withdrawn (``BlockRemoved``, same hashes and medium) as soon as one
of them leaves (evicted, cleared, deleted, released, expired, corrupt). Either input may come
first: objects stored before their description are announced when it arrives.

Each emitted batch goes out as ``(topic, seq, KVEventBatch)`` (:mod:`gpukv.ops.vllm_wire`) on a
protected XPUB socket (:mod:`gpukv.ops.event_socket`), seq from 0, an ``AllBlocksCleared`` first
(a new server process: what an earlier one announced is void). A unit's events also go to the
*outbox* of the engine group that described it first asking for them (``take_events``): that
engine republishes them through vLLM's own event publisher (its ``take_events``), so a router
that only follows engines sees each gpukv block on one engine, never on all of them. An outbox
not drained for ``stale_s`` loses its units to the next engine that describes them.

Bounds: ``max_units`` descriptions (:class:`~gpukv.ops.router_blocks.UnitTable`); described
chunks waiting for the thread, ``max_pending_chunks`` (past it a description is refused with
``Busy`` and changes nothing: the engine's describer drops it, counted); ``max_pending``
inputs waiting for the thread (past it everything is dropped and the stream restarts with
``AllBlocksCleared``: objects held then are announced again only when they change), outboxes of
``outbox_size`` events (oldest dropped, counted). A subscriber that falls behind the socket's
high-water mark loses batches and sees a gap in seq.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable

import zmq

from gpukv.errors import Busy
from gpukv.ops import vllm_wire as w
from gpukv.ops.event_socket import open_pub, subscription_delta
from gpukv.ops.events import KvEvent, KvStored
from gpukv.ops.router_blocks import TIER_BITS, Unit, UnitTable, check_chunk, make_unit
from gpukv.ops.router_outboxes import Outboxes
from gpukv.zmq_context import OwnedContext

log = logging.getLogger(__name__)
_ALL = sum(TIER_BITS.values())
_CLEARED = w.encode(w.AllBlocksCleared())


class RouterEvents:
    """The translator (see the module docstring). ``ranks_of(model, tp_size)``: the KV ranks
    whose objects a model's chunk needs (None while the model is unknown); ``chunk_size``: the
    server's, which every description must fit."""

    def __init__(self, address: str | None, *, ranks_of: Callable[[str, int], tuple[int, ...] | None],
                 chunk_size: int, topic: str = "", max_units: int = 1 << 16,
                 max_pending: int = 1 << 20, max_pending_chunks: int = 1 << 16,
                 outbox_size: int = 1 << 16, stale_s: float = 60.0,
                 allow_remote: bool = False, key_file: str | None = None, batch_s: float = 0.005,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.chunk_size, self.topic = chunk_size, topic.encode()
        self.max_pending = max_pending
        self.outboxes = Outboxes(outbox_size, stale_s, clock)
        self.max_pending_chunks = max_pending_chunks
        self._pending_chunks = 0  # chunks of the descriptions waiting for the thread
        self._ranks_of, self.batch_s = ranks_of, batch_s
        self.epoch = time.time_ns()
        self.table = UnitTable(max_units)
        self._held: dict[tuple[int, int, bytes], int] = {}  # object -> tier bits (thread only)
        self._model_ids: dict[str, int] = {}
        self._ranks: dict[tuple[str, int], tuple[int, ...]] = {}
        self._cond = threading.Condition()
        self._pending: collections.deque = collections.deque()
        self._busy = self._closing = False
        self._batch: list[bytes] = [_CLEARED]
        self.seq = self.sent = self.subscriptions = self.resets = 0
        self.address: str | None = None
        self._sock = self._curve = None
        if address is not None:
            self._zmq = OwnedContext(self)
            try:
                self._sock, self._curve, self.address = open_pub(
                    self._zmq, address, allow_remote=allow_remote, key_file=key_file)
            except (zmq.ZMQError, ValueError):
                self._zmq.close()
                raise
        self._thread = threading.Thread(target=self._run, name="gpukv-vllm-events", daemon=True)
        self._thread.start()

    # ---- inputs (any thread, O(1) under the lock) ------------------------------------------
    def on_event(self, event: KvEvent) -> None:
        """gpukv's event listener (called under the publisher's lock, in seq order)."""
        self._put(("event", event))

    def describe(self, group: str, body: Any) -> tuple[list[bytes], bool] | None:
        """Take one ``VllmBlocks`` of an engine of ``group`` (ValueError naming a chunk that does
        not fit: nothing is taken then). With ``body.take_events``, returns ``(events, more)``:
        the events of the units that group announces, encoded (:mod:`gpukv.ops.vllm_wire`),
        oldest first, at most ``MAX_REPLY_BYTES`` of them, and whether more are waiting
        (:mod:`gpukv.ops.router_outboxes`)."""
        for i, chunk in enumerate(body.chunks):
            check_chunk(i, chunk, body.block_size, self.chunk_size)
        owner = group if body.take_events else None
        with self._cond:
            if body.chunks and self._pending_chunks + len(body.chunks) > self.max_pending_chunks:
                raise Busy(f"busy: {self._pending_chunks} described chunks wait for the vLLM "
                           f"events' thread (at most {self.max_pending_chunks}); describe them later")
            self._pending_chunks += len(body.chunks)
        self._put(("describe", owner, body))
        return None if owner is None else self.outboxes.take(owner)

    def _put(self, item: tuple) -> None:
        with self._cond:
            if self._closing:
                return
            if len(self._pending) >= self.max_pending:
                self._pending_chunks -= sum(len(i[2].chunks) for i in self._pending if i[0] == "describe")
                self._pending.clear()
                self._pending.append(("reset",))
                self.resets += 1
            self._pending.append(item)
            if len(self._pending) == 1:  # one wake-up per burst (a commit's objects...)
                self._cond.notify()

    # ---- the thread --------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait(0.05)
                    self._poll_subscriptions()
            time.sleep(self.batch_s)  # let the burst arrive: one batch, not a thread switch per event
            with self._cond:
                items = list(self._pending)
                self._pending.clear()
                self._busy = bool(items)
                closing = self._closing
            for item in items:
                getattr(self, "_apply_" + item[0])(*item[1:])
            self._send()
            with self._cond:
                self._busy = False
                self._cond.notify_all()
                if closing and not self._pending:
                    break
        if self._sock is not None:
            self._zmq.close_socket(self._sock, linger=1000)
            if self._curve is not None:
                self._curve.stop()
            self._zmq.close()

    def _apply_event(self, event: KvEvent) -> None:
        mid = self._model_ids.setdefault(event.model, len(self._model_ids))
        bit, stored = TIER_BITS[event.tier], isinstance(event, KvStored)
        for h in event.chunk_hashes:
            key = (mid, event.kv_rank, h)
            old = self._held.get(key, 0)
            new = old | bit if stored else old & ~bit
            if new == old:
                continue
            if new:
                self._held[key] = new
            else:
                del self._held[key]
            for unit in self.table.by_object.get((event.model, h), ()):
                self._evaluate(unit)

    def _apply_describe(self, owner: str | None, body: Any) -> None:
        with self._cond:
            self._pending_chunks -= len(body.chunks)
        key_head = (tuple(body.models), body.tp_size)
        for chunk in body.chunks:
            key = (*key_head, chunk.chunk_hash)
            unit = self.table.get(key)
            if unit is None:
                unit = make_unit(key, chunk, body, owner)
                if self.table.add(unit):
                    self._evaluate(unit)
                continue
            self.table.touch(unit)
            if owner is not None and unit.owner != owner and self.outboxes.claimable(unit.owner):
                unit.owner = owner
                self.outboxes.push(owner, [unit.stored(t) for t, b in TIER_BITS.items() if unit.announced & b])

    def _apply_reset(self) -> None:
        """Inputs were lost: nothing said before is known to hold any more."""
        log.warning("gpukv vLLM events: more than %d inputs waiting; the stream restarts "
                    "(AllBlocksCleared)", self.max_pending)
        self._held.clear()
        self.table.clear()
        self._batch.append(_CLEARED)
        self.outboxes.push_all(_CLEARED)

    def _evaluate(self, unit: Unit) -> None:
        """Announce or withdraw ``unit`` in each tier where that changed."""
        models, tp_size, chunk_hash = unit.key
        mask = _ALL
        for model in models:
            ranks = self._kv_ranks(model, tp_size)
            mid = self._model_ids.get(model)
            if ranks is None or mid is None:
                mask = 0
                break
            for rank in ranks:
                mask &= self._held.get((mid, rank, chunk_hash), 0)
            if not mask:
                break
        changed = mask ^ unit.announced
        if not changed:
            return
        out = [unit.stored(tier) if mask & bit else unit.removed(tier)
               for tier, bit in TIER_BITS.items() if changed & bit]
        self.table.set_announced(unit, mask)
        self._batch.extend(out)
        if unit.owner is not None:
            self.outboxes.push(unit.owner, out)

    def _kv_ranks(self, model: str, tp_size: int) -> tuple[int, ...] | None:
        ranks = self._ranks.get((model, tp_size))
        if ranks is None:
            ranks = self._ranks_of(model, tp_size)
            if ranks is not None:
                self._ranks[(model, tp_size)] = ranks
        return ranks

    def _send(self) -> None:
        batch, self._batch = self._batch, []
        if not batch or self._sock is None:
            return
        frames = w.batch_frames(self.topic, self.seq, time.time(), batch)
        self.seq += 1
        try:
            self._sock.send_multipart(frames, zmq.NOBLOCK)  # PUB never blocks: drops at HWM
            self.sent += len(batch)
        except zmq.Again:
            pass
        self._poll_subscriptions()

    def _poll_subscriptions(self) -> None:
        if self._sock is not None:
            self.subscriptions += subscription_delta(self._sock)

    # ---- waiting and closing -----------------------------------------------------------------
    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every input so far is applied and its batch sent; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._cond.notify_all()
            while self._pending or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def wait_for_subscribers(self, count: int = 1, timeout_s: float = 5.0) -> bool:
        """Wait until ``count`` subscriptions are live (ZMQ drops what PUB sends before)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._cond:
                if self.subscriptions >= count:
                    return True
                self._cond.wait(0.05)
        return False

    def stats(self) -> dict:
        with self._cond:
            pending = len(self._pending)
        return dict(units=len(self.table), refused=self.table.refused, dropped=self.table.dropped,
                    batches=self.seq, events=self.sent, resets=self.resets, pending=pending,
                    outbox_dropped=self.outboxes.dropped)

    def close(self, timeout_s: float = 5.0) -> None:
        """Apply and send what is queued, then close the socket (idempotent)."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout_s)
        if self.address is not None and self.address.startswith("ipc://"):
            Path(self.address[len("ipc://"):]).unlink(missing_ok=True)
