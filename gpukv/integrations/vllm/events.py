"""gpukv's KV events as vLLM's: what the connector's ``take_events`` hands to vLLM's event
publisher (``--kv-events-config``), so a cache-aware router follows gpukv's tiers beside vLLM's
own blocks.

The bridge subscribes to ``gpukv serve --events ADDRESS`` (``"gpukv.events_address"`` in
``kv_connector_extra_config``) and turns every event of this engine's model into a
``BlockStored`` / ``BlockRemoved``:

- ``block_hashes``: gpukv's 16-byte chunk hashes (one per ``chunk_size`` tokens, chained from the
  server's salt and the request's seed: see :func:`gpukv.engine.keys.chunk_hashes`), not vLLM's
  per-block hashes; ``block_size`` is the chunk size; ``token_ids`` are not carried (empty);
- ``medium``: ``"gpukv:L1"``, ``"gpukv:disk"`` or ``"gpukv:remote"``.

A gap in the event numbering (a slow reader, a late start) is logged once: the router's view may
then lack or keep objects until it resyncs.
"""

from __future__ import annotations

import logging
from typing import Any

from gpukv.ops.events import KvStored
from gpukv.ops.replay import EventSubscriber, TierState

log = logging.getLogger(__name__)
MAX_PER_CALL = 4096


class EventsBridge:
    """A SUB socket on the server's events, translated for one model."""

    def __init__(self, address: str, model: str, chunk_size: int) -> None:
        self.model, self.chunk_size = model, chunk_size
        self._subscriber = EventSubscriber(address)
        self._state = TierState()  # only for the numbering: gaps are reported once each
        self._gaps = 0

    def take(self) -> list[Any]:
        """The vLLM events of what arrived since the last call (never blocks)."""
        from vllm.distributed.kv_events import BlockRemoved, BlockStored

        out: list[Any] = []
        for _ in range(MAX_PER_CALL):
            try:
                event = self._subscriber.recv(timeout_s=0)
            except ValueError as exc:  # a frame that is not a gpukv event: skip it
                log.warning("gpukv events: dropped a bad frame (%s)", exc)
                continue
            if event is None:
                break
            self._state.apply(event)
            if len(self._state.gaps) > self._gaps:
                self._gaps = len(self._state.gaps)
                log.warning("gpukv events: %d missed (the router's view of gpukv may be stale)",
                            self._state.gaps[-1][2] - self._state.gaps[-1][1])
            if event.model != self.model:
                continue
            hashes = list(event.chunk_hashes)
            medium = f"gpukv:{event.tier}"
            if isinstance(event, KvStored):
                out.append(BlockStored(block_hashes=hashes, parent_block_hash=None, token_ids=[],
                                       block_size=self.chunk_size, lora_id=None, medium=medium,
                                       lora_name=None))
            else:
                out.append(BlockRemoved(block_hashes=hashes, medium=medium))
        return out

    def close(self) -> None:
        self._subscriber.close()

    def __enter__(self) -> "EventsBridge":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
