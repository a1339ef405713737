"""vLLM's KV-event wire format, written without importing vLLM (``gpukv serve`` does not depend on
it): the structs of ``vllm/distributed/kv_events.py`` (vLLM 0.32) field for field, so vLLM's own
decoder and the routers that follow vLLM engines (llm-d's KV-cache indexer, Dynamo's router)
read what gpukv publishes. ``tests/test_router_events.py`` decodes these bytes with vLLM's
structs.

- ``KVEventBatch``: a msgpack *array* ``[ts, events, data_parallel_rank]`` (the last omitted
  when None);
- each event a msgpack *map* tagged ``"type": "BlockStored" | "BlockRemoved" |
  "AllBlocksCleared"``, fields at their defaults omitted;
- on a ZMQ PUB socket, one message per batch of three frames: ``topic`` (bytes),
  ``seq`` (8 bytes big-endian, from 0 for each publisher process) and the batch.
"""

from __future__ import annotations

from typing import Any, Union

import msgspec

ExternalBlockHash = Union[bytes, int]


class _Event(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class BlockStored(_Event):
    block_hashes: list[ExternalBlockHash]
    parent_block_hash: ExternalBlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None


class BlockRemoved(_Event):
    block_hashes: list[ExternalBlockHash]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(_Event):
    pass


Event = Union[BlockStored, BlockRemoved, AllBlocksCleared]


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Event]
    data_parallel_rank: int | None = None


_ENCODER = msgspec.msgpack.Encoder()
_EVENT_DECODER = msgspec.msgpack.Decoder(Event)
_BATCH_DECODER = msgspec.msgpack.Decoder(KVEventBatch)


def encode(obj: Event | KVEventBatch) -> bytes:
    return _ENCODER.encode(obj)


def decode_event(payload: bytes) -> Event:
    return _EVENT_DECODER.decode(payload)


def decode_batch(payload: bytes) -> KVEventBatch:
    return _BATCH_DECODER.decode(payload)


def batch_frames(topic: bytes, seq: int, ts: float, encoded_events: list[bytes]) -> list[bytes]:
    """The three frames of one batch of already encoded events (each event is encoded once,
    when it is made, and spliced into the array here)."""
    return [topic, seq.to_bytes(8, "big"), _batch_bytes(ts, encoded_events)]


def _batch_bytes(ts: float, encoded_events: list[bytes]) -> bytes:
    n = len(encoded_events)
    head = bytes([0x92]) + _ENCODER.encode(ts)  # fixarray of 2: [ts, events]
    if n < 16:
        count = bytes([0x90 | n])
    elif n < 1 << 16:
        count = b"\xdc" + n.to_bytes(2, "big")
    else:
        count = b"\xdd" + n.to_bytes(4, "big")
    return head + count + b"".join(encoded_events)
