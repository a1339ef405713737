"""The messages a client sends the ``gpukv serve`` process: the request bodies of
:mod:`gpukv.frontend.protocol` (a tagged union, ``type`` is the tag) and the bounded field types
they are built of. Decoding is strict: each bound here is a :class:`~gpukv.frontend.protocol.
ProtocolError` naming the field when a request breaks it."""

from __future__ import annotations

from typing import Annotated, Literal, Union

import msgspec

from gpukv.constants import HASH_BYTES, MAX_READERS

MAX_HASHES = 1 << 17  # hashes in one request (x ranks: the server's max_keys_per_request)

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Secret = Annotated[str, msgspec.Meta(min_length=16, max_length=128)]
Id = Union[Name, Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]]
Count = Annotated[int, msgspec.Meta(ge=1, le=MAX_READERS)]
Small = Annotated[int, msgspec.Meta(ge=0, le=1 << 32)]
Tokens = Annotated[int, msgspec.Meta(ge=0, le=1 << 40)]
Hash = Annotated[bytes, msgspec.Meta(min_length=HASH_BYTES, max_length=HASH_BYTES)]
Hashes = Annotated[list[Hash], msgspec.Meta(max_length=MAX_HASHES)]
PlanId = Annotated[int, msgspec.Meta(ge=1, le=(1 << 63) - 1)]


class _Msg(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="type"):
    pass


class Layout(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What the books need of a paged cache (``PagedKV.describe()``): no tensors, no pointers."""

    kind: Literal["mla", "mha"]
    dims: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    dtype: Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
    num_layers: Small
    num_kv: Small
    num_heads: Small
    head_bytes: Small
    row_bytes: Small
    block_size: Small = 0
    num_blocks: Small = 0


# ---- requests ----------------------------------------------------------------------------------
class Ping(_Msg, tag="ping"):
    """Liveness, and the handshake. ``pid`` is informational only: the server tells a dead
    worker from a stalled one by the peer process it observes itself (never a reported pid)."""

    pid: Annotated[int, msgspec.Meta(ge=0, le=1 << 31)] | None = None


class Register(_Msg, tag="register"):
    """``device``: the worker's pages' device across processes (``cpu``, ``cuda-uuid:<uuid>``) or
    an arena's configured name; ``shared`` (MLA): one object per chunk for the whole TP group
    (the worker can read every arena), else one per rank (see :mod:`gpukv.l1.topology`)."""

    instance_id: Id
    model: Name
    layout: Layout
    tp_rank: Annotated[int, msgspec.Meta(ge=0, le=MAX_READERS - 1)]
    tp_size: Count
    device: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    shared: bool = True


class Unregister(_Msg, tag="unregister"):
    instance_id: Id


class StoreBegin(_Msg, tag="store_begin"):
    instance_id: Id
    hashes: Hashes


class StoreCommit(_Msg, tag="store_commit"):
    plan: PlanId
    ok: bool = True  # False: the copy failed, discard the reservation


class Lookup(_Msg, tag="lookup", omit_defaults=True):
    """Fields at their defaults are not sent, so a server that predates a field still reads
    requests that do not use it. ``tiers``: the reply is ``{"tokens", "sources"}`` (the hit's
    per-chunk sources as runs, :mod:`gpukv.engine.hit_sources`) instead of the tokens alone;
    servers that know it say ``"lookup_tiers"`` in their PING reply's ``features``."""

    model: Name
    request_id: Id
    hashes: Hashes
    tp_size: Count = 1
    num_readers: Count | None = None
    # True: count a hit only if the caller's group has registered instances of the model for
    # every TP rank 0..tp_size-1 (a scheduler asks for what its own workers can load)
    loadable: bool = False
    tiers: bool = False


class RetrieveBegin(_Msg, tag="retrieve_begin"):
    instance_id: Id
    request_id: Id
    hashes: Hashes


class RetrieveEnd(_Msg, tag="retrieve_end"):
    plan: PlanId


class FreeLookupLocks(_Msg, tag="free_lookup_locks"):
    request_id: Id
    start_token: Tokens = 0
    end_token: Tokens | None = None
    tp_size: Count = 1  # accepted for compatibility; shares are the request's, whatever it is


class EndSession(_Msg, tag="end_session"):
    request_id: Id


class ReadCounts(_Msg, tag="read_counts"):
    """Read-only debug query: shares held on (and evictability of) the objects of a prefix."""

    model: Name
    hashes: Hashes
    kv_rank: Annotated[int, msgspec.Meta(ge=0, le=MAX_READERS - 1)] = 0


BlockHash = Union[Annotated[bytes, msgspec.Meta(min_length=1, max_length=64)], int]  # int: 64-bit
ExtraKey = Union[Annotated[str, msgspec.Meta(max_length=4096)], int,  # no prompt embeds: not cached
                 Annotated[list[Union[Annotated[str, msgspec.Meta(max_length=4096)], int]],
                           msgspec.Meta(max_length=8)]]


class ChunkBlocks(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    """vLLM's description of one gpukv chunk (``chunk_hash``): its blocks' hashes (vLLM's own,
    ``chunk_size / block_size`` of them), the hash of the block before it (None for the first
    chunk), its token ids and per block the extra keys vLLM publishes (LoRA name, multimodal
    ``[identifier, offset]``, cache salt; None for a block without any)."""

    chunk_hash: Hash
    block_hashes: Annotated[list[BlockHash], msgspec.Meta(min_length=1, max_length=1 << 16)]
    parent: BlockHash | None
    token_ids: Annotated[list[Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]],
                         msgspec.Meta(min_length=1, max_length=1 << 20)]
    extra_keys: Annotated[list[Annotated[list[ExtraKey], msgspec.Meta(max_length=64)] | None],
                          msgspec.Meta(max_length=1 << 16)] | None = None


class VllmBlocks(_Msg, tag="vllm_blocks"):
    """A vLLM scheduler tells the server which vLLM blocks its chunks hold, for the vLLM-format
    KV events (``gpukv serve --vllm-events``; :mod:`gpukv.ops.router_events`). ``models``: the
    model key of each pipeline stage (a chunk is a block for routers once every stage's objects
    of it are held); ``take_events``: the reply carries the vLLM events of the blocks this
    caller's group announced first (its engine republishes them in ``take_events``). Servers
    that take it say ``"vllm_blocks"`` in their PING reply's ``features``."""

    models: Annotated[list[Name], msgspec.Meta(min_length=1, max_length=64)]
    tp_size: Count
    block_size: Annotated[int, msgspec.Meta(ge=1, le=1 << 20)]
    chunks: Annotated[list[ChunkBlocks], msgspec.Meta(max_length=4096)] = []
    group_idx: Small = 0
    lora_id: Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)] | None = None
    lora_name: Name | None = None
    spec_kind: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    take_events: bool = False


class Stats(_Msg, tag="stats"):
    query: ReadCounts | None = None


class Flush(_Msg, tag="flush"):
    timeout_s: Annotated[float, msgspec.Meta(ge=0, le=3600)] | None = None
