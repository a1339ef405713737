"""The wire protocol between :class:`gpukv.CacheClient` and the ``gpukv serve`` process.

One request is one ZMQ frame holding a msgpack map (never pickle)::

    {"v": 2, "seq": <int>, "session": <secret>, "group": <secret or absent>, "body": {...}}

``session`` is the client's random id (never echoed back); ``group`` names the requests a session
may see: sessions of one group (the scheduler and the workers of one engine) share requests, any
other session cannot retrieve with, release or learn about them. ``body`` is a tagged union of
the structs below (``type`` is the tag). Each request gets one :class:`Reply` with the same
``seq``. Decoding is strict: unknown types, unknown or missing fields, wrong types and
out-of-range numbers are :class:`ProtocolError` (a ``ValueError``) naming the field, e.g.
``Expected `int` <= 128 - at `$.body.tp_size```. Chunk hashes travel as 16-byte strings.

Only metadata crosses the socket: the server answers STORE_BEGIN / RETRIEVE_BEGIN with arena
offsets, and the worker copies between its own pages and the arena it mapped at REGISTER.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import msgspec

from gpukv.constants import HASH_BYTES, MAX_READERS
from gpukv.errors import Busy
from gpukv.private_paths import runtime_dir

PROTOCOL_VERSION = 2
MAX_HASHES = 1 << 17  # hashes in one request (x ranks: the server's max_keys_per_request)
MAX_FRAME_BYTES = 8 << 20

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Secret = Annotated[str, msgspec.Meta(min_length=16, max_length=128)]
Id = Union[Name, Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]]
Count = Annotated[int, msgspec.Meta(ge=1, le=MAX_READERS)]
Small = Annotated[int, msgspec.Meta(ge=0, le=1 << 32)]
Tokens = Annotated[int, msgspec.Meta(ge=0, le=1 << 40)]
Hash = Annotated[bytes, msgspec.Meta(min_length=HASH_BYTES, max_length=HASH_BYTES)]
Hashes = Annotated[list[Hash], msgspec.Meta(max_length=MAX_HASHES)]
PlanId = Annotated[int, msgspec.Meta(ge=1, le=(1 << 63) - 1)]


def default_address() -> str:
    """``ipc://<runtime folder>/gpukv.sock``: ``$XDG_RUNTIME_DIR/gpukv.sock``, else
    ``/tmp/gpukv-<uid>/gpukv.sock`` (a folder of this user's, mode 0700, so no other user can
    bind the path first), else, when another user holds that folder,
    ``~/.cache/gpukv/run/gpukv.sock`` (:func:`gpukv.private_paths.runtime_dir`)."""
    return f"ipc://{runtime_dir() / 'gpukv.sock'}"


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


Body = Union[Ping, Register, Unregister, StoreBegin, StoreCommit, Lookup, RetrieveBegin,
             RetrieveEnd, FreeLookupLocks, EndSession, Stats, Flush, VllmBlocks]


class Request(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    v: int
    seq: Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]
    session: Secret
    body: Body
    group: Secret | None = None


class Reply(msgspec.Struct, frozen=True):
    """``ok`` with ``value``, or an ``error`` message and its ``error_type``."""

    v: int
    seq: int
    ok: bool
    value: Any = None
    error: str = ""
    error_type: Literal["", "ValueError", "TypeError", "Busy", "RuntimeError"] = ""


class _Header(msgspec.Struct):
    v: int
    seq: int = 0


class Envelope(msgspec.Struct, frozen=True):
    """Who sent a request and its ``seq``, read without decoding its body."""

    v: int
    seq: Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]
    session: Secret
    group: Secret | None = None


class ProtocolError(ValueError):
    """A frame that is not a valid request; ``seq`` is the request's, when it could be read."""

    def __init__(self, message: str, seq: int = 0) -> None:
        super().__init__(message)
        self.seq = seq


# ---- encoding and validation -------------------------------------------------------------------
_ENCODER = msgspec.msgpack.Encoder()
_REQUEST_DECODER = msgspec.msgpack.Decoder(Request)
_HEADER_DECODER = msgspec.msgpack.Decoder(_Header)
_ENVELOPE_DECODER = msgspec.msgpack.Decoder(Envelope)
_REPLY_DECODER = msgspec.msgpack.Decoder(Reply)


def encode_request(seq: int, session: str, body: Body, group: str | None = None) -> bytes:
    return _ENCODER.encode(Request(PROTOCOL_VERSION, seq, session, body, group))


def decode_request(frame: bytes) -> Request:
    """Decode and validate one request frame; raises :class:`ProtocolError` naming the problem
    (a frame too deeply nested for the decoder included)."""
    if len(frame) > MAX_FRAME_BYTES:
        raise _too_large(frame)
    try:  # one decode for a good frame; the header is read apart only to explain a bad one
        request = _REQUEST_DECODER.decode(frame)
    except (msgspec.DecodeError, RecursionError) as exc:
        seq = _check_version(frame)  # a bad version or header is reported first, as it was
        raise ProtocolError(f"malformed request: {_reason(exc)}", seq) from None
    if request.v != PROTOCOL_VERSION:
        raise _bad_version(request.v, request.seq)
    seq, body = request.seq, request.body
    if isinstance(body, Register) and body.tp_rank >= body.tp_size:
        raise ProtocolError(f"invalid register request: tp_rank must be in [0, tp_size="
                            f"{body.tp_size}), got {body.tp_rank}", seq)
    if isinstance(body, FreeLookupLocks) and body.end_token is not None \
            and body.end_token < body.start_token:
        raise ProtocolError(f"invalid free_lookup_locks request: end_token {body.end_token} is "
                            f"before start_token {body.start_token}", seq)
    return request


def decode_envelope(frame: bytes) -> Envelope:
    """The envelope of a request frame, its body skipped, not decoded (cheap for a large frame:
    no objects are built for it); :func:`decode_request` validates the rest later."""
    seq = _check_version(frame)
    try:
        return _ENVELOPE_DECODER.decode(frame)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise ProtocolError(f"malformed request: {_reason(exc)}", seq) from None


def _check_version(frame: bytes) -> int:
    """The frame's ``seq`` (0 when unreadable) after checking its size and protocol version."""
    if len(frame) > MAX_FRAME_BYTES:
        raise _too_large(frame)
    try:
        header = _HEADER_DECODER.decode(frame)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise ProtocolError(f"malformed request: {_reason(exc)}") from None
    seq = header.seq if 0 <= header.seq < (1 << 63) else 0
    if header.v != PROTOCOL_VERSION:
        raise _bad_version(header.v, seq)
    return seq


def _too_large(frame: bytes) -> ProtocolError:
    return ProtocolError(f"request of {len(frame)} bytes is over the {MAX_FRAME_BYTES}-byte limit")


def _bad_version(version: int, seq: int) -> ProtocolError:
    return ProtocolError(f"unsupported protocol version {version!r} (server speaks "
                         f"{PROTOCOL_VERSION})", seq)


def _reason(exc: BaseException) -> str:
    return "nested too deeply" if isinstance(exc, RecursionError) else str(exc)


def encode_reply(reply: Reply) -> bytes:
    return _ENCODER.encode(reply)


def decode_reply(frame: bytes) -> Reply:
    try:
        return _REPLY_DECODER.decode(frame)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise ProtocolError(f"malformed reply from the server: {_reason(exc)}") from None


def ok_reply(seq: int, value: Any = None) -> Reply:
    return Reply(PROTOCOL_VERSION, seq, True, value)


def error_reply(seq: int, exc: BaseException) -> Reply:
    """The reply to a request that raised ``exc``: its type (coarsened) and its message."""
    kind = ("Busy" if isinstance(exc, Busy) else "ValueError" if isinstance(exc, ValueError)
            else "TypeError" if isinstance(exc, TypeError) else "RuntimeError")
    message = str(exc) or type(exc).__name__
    return Reply(PROTOCOL_VERSION, seq, False, None, f"{type(exc).__name__}: {message}", kind)
