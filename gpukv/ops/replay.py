"""Following the cache through KV events: :class:`TierState` (what each tier holds, rebuilt from
the events, with sequence-gap detection), the pure :func:`replay`, and :class:`EventSubscriber`
(a ZMQ SUB socket on a publisher's address).

Rules of the replay:

* ``KvStored`` adds its keys ``(model, kv_rank, chunk_hash)`` to its tier; ``KvRemoved`` takes
  them out (a key it never saw is counted in ``unknown_removals``).
* Within one ``epoch`` the ``seq`` numbers must run 0, 1, 2, ...; anything else (a first event
  after 0, a skip, a repeat) is recorded in ``gaps`` as ``(epoch, expected, got)`` and the state
  is no longer :attr:`TierState.complete` — what it holds may lack or keep objects.
* A new ``epoch`` is a new publisher process: L1 and disk start empty again (the new process
  announces what its disk tier found with reason ``restart``); the remote tier, which outlives a
  server, is kept. The remote tier is only what this publisher saw: a Redis/Valkey server's own
  evictions produce no event.
"""

from __future__ import annotations

from typing import Iterable

import zmq

from gpukv.curve_keys import load_keys, secure_client
from gpukv.ops.events import TIERS, EventKey, KvEvent, KvStored, decode_event
from gpukv.zmq_context import OwnedContext

RESET_ON_NEW_EPOCH = ("L1", "disk")


class TierState:
    """The objects each tier holds according to the events applied so far.

    ``tiers``: ``{"L1": set, "disk": set, "remote": set}`` of ``(model, kv_rank, chunk_hash)``.
    ``gaps``: ``(epoch, expected_seq, got_seq)`` for every break in the numbering.
    """

    def __init__(self) -> None:
        self.tiers: dict[str, set[EventKey]] = {tier: set() for tier in TIERS}
        self.gaps: list[tuple[int, int, int]] = []
        self.epoch: int | None = None
        self.next_seq = 0
        self.applied = 0
        self.unknown_removals = 0

    @property
    def complete(self) -> bool:
        """True while no event has been missed since the first one applied."""
        return not self.gaps

    def apply(self, event: KvEvent) -> None:
        """Apply one event (in the order the publisher numbered them)."""
        if event.epoch != self.epoch:
            if self.epoch is not None:
                for tier in RESET_ON_NEW_EPOCH:
                    self.tiers[tier].clear()
            self.epoch, self.next_seq = event.epoch, 0
        if event.seq != self.next_seq:
            self.gaps.append((event.epoch, self.next_seq, event.seq))
        self.next_seq = event.seq + 1
        held = self.tiers[event.tier]
        if isinstance(event, KvStored):
            held.update(event.keys())
        else:
            for key in event.keys():
                if key in held:
                    held.remove(key)
                else:
                    self.unknown_removals += 1
        self.applied += 1

    def apply_all(self, events: Iterable[KvEvent]) -> "TierState":
        for event in events:
            self.apply(event)
        return self


def replay(events: Iterable[KvEvent]) -> TierState:
    """A fresh :class:`TierState` with ``events`` applied in order (``.tiers`` is the
    ``dict[tier, set[key]]``; check ``.complete`` before trusting it)."""
    return TierState().apply_all(events)


class EventSubscriber:
    """A SUB socket on an :class:`~gpukv.ops.events.EventPublisher`'s address (tcp://: a CURVE
    client with the key file ``key_file``, default :func:`gpukv.curve_keys.key_file`).

    ZMQ delivers nothing published before the subscription reached the publisher: a subscriber
    that joins late sees its first ``seq`` above 0 and its :class:`TierState` reports the gap.
    """

    def __init__(self, address: str, *, rcvhwm: int = 100_000, key_file: str | None = None) -> None:
        if not isinstance(address, str) or not address.startswith(("ipc://", "tcp://")):
            raise ValueError(f"address must be ipc://... or tcp://..., got {address!r}")
        self.address = address
        keys = load_keys(key_file) if address.startswith("tcp://") else None  # CURVE on tcp://
        self._zmq = OwnedContext(self)  # closed even if this subscriber is dropped unclosed
        self._sock = self._zmq.socket(zmq.SUB)
        if keys is not None:
            secure_client(self._sock, keys)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._sock.connect(address)

    def recv(self, timeout_s: float | None = None) -> KvEvent | None:
        """The next event, or ``None`` after ``timeout_s`` (``None``: wait for ever);
        ``ValueError`` for a frame that is not a valid event."""
        timeout_ms = -1 if timeout_s is None else max(0, int(timeout_s * 1000))
        if not self._sock.poll(timeout_ms, zmq.POLLIN):
            return None
        return decode_event(self._sock.recv())

    def recv_into(self, state: TierState, count: int, timeout_s: float) -> int:
        """Apply up to ``count`` events to ``state``, waiting at most ``timeout_s`` for each;
        returns how many were applied."""
        applied = 0
        while applied < count:
            event = self.recv(timeout_s)
            if event is None:
                break
            state.apply(event)
            applied += 1
        return applied

    def close(self) -> None:
        self._zmq.close()

    def __enter__(self) -> "EventSubscriber":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
