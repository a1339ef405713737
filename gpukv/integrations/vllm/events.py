"""What the connector's ``take_events`` hands vLLM's event publisher (``--kv-events-config``):
the gpukv blocks this engine republishes, as vLLM's ``BlockStored`` / ``BlockRemoved``.

The server announces each gpukv chunk as vLLM blocks once (:mod:`gpukv.ops.router_events`) and
gives each announcement to one engine: the first that described the chunk asking for events
(:mod:`.block_meta`). So a router that follows vLLM engines sees each block gpukv holds on one
engine of the node -- one that can load it -- never on every engine:

- ``block_hashes``: vLLM's own block hashes (``block_size``: vLLM's block size; one event per
  gpukv chunk, ``chunk_size / block_size`` hashes), ``parent_block_hash``, ``token_ids``,
  ``lora_id`` / ``lora_name``, ``extra_keys``, ``group_idx``: as vLLM's own events carry them;
- ``medium``: ``"gpukv:L1"``, ``"gpukv:disk"`` or ``"gpukv:remote"``.

A new server process (another ``epoch``), or a server that lost its inputs (it sends
``AllBlocksCleared``), announced nothing this engine republished: each of those blocks is
withdrawn here (``BlockRemoved``). vLLM's ``AllBlocksCleared`` is never passed on: it would clear
the engine's own GPU blocks in the router's view as well.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any

log = logging.getLogger(__name__)

MAX_EVENTS = 1 << 16  # events waiting for take_events (oldest dropped past it)


class EngineEvents:
    """Events from the server's replies (any thread) to ``take_events`` (vLLM's scheduler)."""

    def __init__(self, max_events: int = MAX_EVENTS) -> None:
        self._lock = threading.Lock()
        self._events: collections.deque = collections.deque(maxlen=max_events)
        self._announced: dict[tuple, int | None] = {}  # (medium, block hashes) -> group_idx
        self._epoch: Any = None
        self.dropped = 0
        self._decoder = None

    def add(self, epoch: Any, encoded: list[bytes]) -> None:
        """The encoded events of one reply of the server process ``epoch``."""
        from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

        if self._decoder is None:
            import msgspec

            self._decoder = msgspec.msgpack.Decoder(BlockStored | BlockRemoved | AllBlocksCleared)
        out = []
        if epoch != self._epoch:
            if self._epoch is not None:
                out += self._withdraw_all(BlockRemoved)
            self._epoch = epoch
        for payload in encoded:
            event = self._decoder.decode(payload)
            if isinstance(event, AllBlocksCleared):
                out += self._withdraw_all(BlockRemoved)
                continue
            key = (event.medium, tuple(event.block_hashes))
            if isinstance(event, BlockStored):
                self._announced[key] = event.group_idx
            else:
                self._announced.pop(key, None)
            out.append(event)
        with self._lock:
            overflow = len(self._events) + len(out) - (self._events.maxlen or 0)
            if overflow > 0:
                self.dropped += overflow
                log.warning("gpukv: %d KV events were not taken by vLLM in time and are lost",
                            overflow)
            self._events.extend(out)

    def _withdraw_all(self, removed_cls: Any) -> list:
        out = [removed_cls(block_hashes=list(hashes), medium=medium, group_idx=group_idx)
               for (medium, hashes), group_idx in self._announced.items()]
        self._announced.clear()
        return out

    def take(self) -> list[Any]:
        """Everything since the last call, oldest first (never blocks on the server)."""
        with self._lock:
            out = list(self._events)
            self._events.clear()
        return out
