"""Shared pieces of the router-events tests: a consumer that decodes vLLM-format KV event batches
with vLLM's own structs and rebuilds the blocks each medium holds, the way a router does."""

from __future__ import annotations

import time
from collections import Counter

import msgspec
import zmq


class Rebuilt:
    """The blocks announced per medium, rebuilt from ``(topic, seq, KVEventBatch)`` messages
    decoded with ``vllm.distributed.kv_events.KVEventBatch``. A block is one event's tuple of
    block hashes (one gpukv chunk). ``duplicates``: stores of a block its medium already held;
    ``unknown_removals``: removals of a block it did not hold; ``gaps``: breaks in seq."""

    def __init__(self) -> None:
        from vllm.distributed.kv_events import KVEventBatch

        self._decoder = msgspec.msgpack.Decoder(KVEventBatch)
        self.media: dict[str, set[tuple]] = {}
        self.stored: list = []  # every BlockStored, in order
        self.duplicates = self.unknown_removals = self.cleared = 0
        self.gaps: list[tuple[int, int]] = []
        self.next_seq: int | None = None
        self.events = Counter()

    def apply_frames(self, frames: list[bytes]) -> None:
        _topic, seq_bytes, payload = frames
        seq = int.from_bytes(seq_bytes, "big")
        if self.next_seq is not None and seq != self.next_seq:
            self.gaps.append((self.next_seq, seq))
        self.next_seq = seq + 1
        self.apply(self._decoder.decode(payload).events)

    def apply(self, events) -> None:
        from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

        for event in events:
            self.events[type(event).__name__] += 1
            if isinstance(event, AllBlocksCleared):
                self.media.clear()
                self.cleared += 1
                continue
            held = self.media.setdefault(event.medium, set())
            block = tuple(event.block_hashes)
            if isinstance(event, BlockStored):
                self.stored.append(event)
                if block in held:
                    self.duplicates += 1
                held.add(block)
            elif isinstance(event, BlockRemoved):
                if block not in held:
                    self.unknown_removals += 1
                held.discard(block)

    def blocks(self) -> dict[str, set[tuple]]:
        return {medium: set(blocks) for medium, blocks in self.media.items() if blocks}


class Subscriber:
    """A plain ZMQ SUB socket on a vLLM-format events address (what a router opens)."""

    def __init__(self, address: str, topic: bytes = b"") -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, topic)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.rebuilt = Rebuilt()

    def drain(self, quiet_s: float = 0.3, timeout_s: float = 10.0) -> Rebuilt:
        """Apply every message until none arrives for ``quiet_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.sock.poll(int(quiet_s * 1000)):
            self.rebuilt.apply_frames(self.sock.recv_multipart())
        return self.rebuilt

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()
