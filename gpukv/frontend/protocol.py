"""The wire protocol between :class:`gpukv.CacheClient` and the ``gpukv serve`` process.

One request is one ZMQ frame holding a msgpack map (never pickle)::

    {"v": 1, "seq": <int>, "session": <client session id>, "body": {"type": "lookup", ...}}

``body`` is a tagged union of the request structs below (``type`` is the tag). The server answers
each request with one :class:`Reply` frame carrying the same ``seq``. Decoding is strict: unknown
request types, unknown or missing fields, wrong types and out-of-range numbers are all
:class:`ProtocolError` (a ``ValueError``) naming the bad field, e.g.
``Expected `int` <= 128 - at `$.body.tp_size```. Token ids and slot mappings travel as raw
little-endian int64 bytes; chunk hashes as 16-byte strings.
"""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal, Union

import msgspec

PROTOCOL_VERSION = 1
from gpukv.constants import HASH_BYTES, MAX_READERS
MAX_TOKENS = 1 << 22
MAX_DIMS = 8
MAX_TENSORS = 4096

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Id = Union[Name, Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]]
Count = Annotated[int, msgspec.Meta(ge=1, le=MAX_READERS)]
Size = Annotated[int, msgspec.Meta(ge=0, le=1 << 48)]
Int64Bytes = Annotated[bytes, msgspec.Meta(max_length=8 * MAX_TOKENS)]
Hash = Annotated[bytes, msgspec.Meta(min_length=HASH_BYTES, max_length=HASH_BYTES)]
Hashes = Annotated[list[Hash], msgspec.Meta(max_length=MAX_TOKENS)]
Shape = Annotated[list[Size], msgspec.Meta(max_length=MAX_DIMS)]
DType = Literal["bfloat16", "float16", "float32", "float64", "float8_e4m3fn", "float8_e5m2",
                "uint8", "int8", "int16", "int32", "int64"]


def default_address() -> str:
    """The server's default address: ``ipc://$XDG_RUNTIME_DIR/gpukv.sock``, else
    ``ipc:///tmp/gpukv-<uid>.sock``."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return f"ipc://{runtime}/gpukv.sock"
    return f"ipc:///tmp/gpukv-{os.getuid()}.sock"


class _Msg(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="type"):
    pass


# ---- worker tensor handles (REGISTER) ----------------------------------------------------------
class ShmTensor(_Msg, tag="shm"):
    """A CPU tensor inside a shared-memory file (see :mod:`gpukv.frontend.shm`); strides in elements."""

    path: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
    offset_bytes: Size
    dtype: DType
    shape: Shape
    stride: Shape


class CudaIpcTensor(_Msg, tag="cuda_ipc"):
    """A CUDA tensor shared by a CUDA IPC handle: the fields of ``reduce_tensor`` as plain data.

    ``device_uuid`` identifies the GPU (indices differ between processes with different
    ``CUDA_VISIBLE_DEVICES``); ``device_index`` is the worker's own index, a fallback only.
    """

    device_index: Annotated[int, msgspec.Meta(ge=0, le=1024)]
    device_uuid: Annotated[str, msgspec.Meta(max_length=64)]
    ipc_handle: Annotated[bytes, msgspec.Meta(min_length=1, max_length=256)]
    storage_size_bytes: Size
    storage_offset_bytes: Size
    ref_counter_handle: Annotated[bytes, msgspec.Meta(max_length=4096)]
    ref_counter_offset: Size
    event_handle: Annotated[bytes, msgspec.Meta(max_length=256)]
    event_sync_required: bool
    dtype: DType
    shape: Shape
    stride: Shape
    offset: Size  # tensor offset in its storage, in elements


TensorHandle = Union[ShmTensor, CudaIpcTensor]


# ---- requests ----------------------------------------------------------------------------------
class Register(_Msg, tag="register"):
    instance_id: Id
    model: Name
    dims: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    kind: Literal["mla", "mha"]
    tp_rank: Annotated[int, msgspec.Meta(ge=0, le=MAX_READERS - 1)]
    tp_size: Count
    tensors: Annotated[list[TensorHandle], msgspec.Meta(min_length=1, max_length=MAX_TENSORS)]
    kv_pair: bool = False  # tensors = K layers then V layers (SGLang MHA pools)


class Unregister(_Msg, tag="unregister"):
    instance_id: Id


class Store(_Msg, tag="store"):
    instance_id: Id
    tokens: Int64Bytes
    slots: Int64Bytes


class Lookup(_Msg, tag="lookup"):
    """``tokens`` or (cheaper) ``hashes``: exactly one of them."""

    model: Name
    request_id: Id
    tp_size: Count = 1
    num_readers: Count | None = None
    tokens: Int64Bytes | None = None
    hashes: Hashes | None = None


class Retrieve(_Msg, tag="retrieve"):
    instance_id: Id
    request_id: Id
    tokens: Int64Bytes
    slots: Int64Bytes


class FreeLookupLocks(_Msg, tag="free_lookup_locks"):
    request_id: Id
    tp_size: Count = 1


class EndSession(_Msg, tag="end_session"):
    request_id: Id


class Ping(_Msg, tag="ping"):
    pass


class ReadCounts(_Msg, tag="read_counts"):
    """Read-only debug query: shares held on (and evictability of) the objects of a prefix."""

    model: Name
    kv_rank: Annotated[int, msgspec.Meta(ge=0, le=MAX_READERS - 1)] = 0
    tokens: Int64Bytes | None = None
    hashes: Hashes | None = None


class Stats(_Msg, tag="stats"):
    query: ReadCounts | None = None


class Flush(_Msg, tag="flush"):
    timeout_s: Annotated[float, msgspec.Meta(ge=0, le=3600)] | None = None


Body = Union[Register, Unregister, Store, Lookup, Retrieve, FreeLookupLocks, EndSession, Ping,
             Stats, Flush]


class Request(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    v: int
    seq: Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]
    session: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    body: Body


class Reply(msgspec.Struct, frozen=True):
    """``ok`` with ``value``, or an ``error`` message and its ``error_type``."""

    v: int
    seq: int
    ok: bool
    value: Any = None
    error: str = ""
    error_type: Literal["", "ValueError", "TypeError", "RuntimeError"] = ""


class _Header(msgspec.Struct):
    v: int
    seq: int = 0


class ProtocolError(ValueError):
    """A frame that is not a valid request; ``seq`` is the request's, when it could be read."""

    def __init__(self, message: str, seq: int = 0) -> None:
        super().__init__(message)
        self.seq = seq


# ---- encoding and validation -------------------------------------------------------------------
def encode_request(seq: int, session: str, body: Body) -> bytes:
    return msgspec.msgpack.encode(Request(PROTOCOL_VERSION, seq, session, body))


def decode_request(frame: bytes) -> Request:
    """Decode and validate one request frame; raises :class:`ProtocolError` naming the problem."""
    try:
        header = msgspec.msgpack.decode(frame, type=_Header)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"malformed request: {exc}") from None
    seq = header.seq if 0 <= header.seq < (1 << 63) else 0
    if header.v != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {header.v!r} (server speaks "
                            f"{PROTOCOL_VERSION})", seq)
    try:
        request = msgspec.msgpack.decode(frame, type=Request)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"malformed request: {exc}", seq) from None
    try:
        check_body(request.body)
    except ValueError as exc:
        raise ProtocolError(f"invalid {request.body.__struct_config__.tag} request: {exc}",
                            seq) from None
    return request


def check_body(body: Body) -> None:
    """The checks the schema cannot express; raises ``ValueError`` naming the bad field."""
    if isinstance(body, Stats) and body.query is not None:
        check_body(body.query)
    for name in ("tokens", "slots"):
        data = getattr(body, name, None)
        if data is not None and len(data) % 8:
            raise ValueError(f"{name} must be little-endian int64 bytes, got {len(data)} bytes "
                             "(not a multiple of 8)")
    if isinstance(body, (Lookup, ReadCounts)) and (body.tokens is None) == (body.hashes is None):
        raise ValueError("exactly one of tokens and hashes must be given")
    if isinstance(body, (Store, Retrieve)) and len(body.tokens) != len(body.slots):
        raise ValueError(f"slots has {len(body.slots) // 8} entries for "
                         f"{len(body.tokens) // 8} tokens")
    if isinstance(body, Register):
        if body.tp_rank >= body.tp_size:
            raise ValueError(f"tp_rank must be in [0, tp_size={body.tp_size}), got {body.tp_rank}")
        for i, t in enumerate(body.tensors):
            if len(t.shape) != len(t.stride) or not t.shape:
                raise ValueError(f"tensors[{i}]: shape {t.shape} and stride {t.stride} must be "
                                 "non-empty and of the same length")


def encode_reply(reply: Reply) -> bytes:
    return msgspec.msgpack.encode(reply)


def decode_reply(frame: bytes) -> Reply:
    try:
        return msgspec.msgpack.decode(frame, type=Reply)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"malformed reply from the server: {exc}") from None


def ok_reply(seq: int, value: Any = None) -> Reply:
    return Reply(PROTOCOL_VERSION, seq, True, value)


def error_reply(seq: int, exc: BaseException) -> Reply:
    """The reply to a request that raised ``exc``: its type (coarsened) and its message."""
    kind = ("ValueError" if isinstance(exc, ValueError)
            else "TypeError" if isinstance(exc, TypeError) else "RuntimeError")
    message = str(exc) or type(exc).__name__
    return Reply(PROTOCOL_VERSION, seq, False, None, f"{type(exc).__name__}: {message}", kind)
