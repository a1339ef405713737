"""The wire protocol between :class:`gpukv.CacheClient` and the ``gpukv serve`` process.

One request is one ZMQ frame holding a msgpack map (never pickle)::

    {"v": 2, "seq": <int>, "session": <secret>, "group": <secret or absent>, "body": {...}}

``session`` is the client's random id (never echoed back); ``group`` names the requests a session
may see: sessions of one group (the scheduler and the workers of one engine) share requests, any
other session cannot retrieve with, release or learn about them. ``body`` is a tagged union of
the structs of :mod:`gpukv.frontend.messages` (``type`` is the tag). Each request gets one
:class:`Reply` with the same ``seq``. Decoding is strict: unknown types, unknown or missing fields, wrong types and
out-of-range numbers are :class:`ProtocolError` (a ``ValueError``) naming the field, e.g.
``Expected `int` <= 128 - at `$.body.tp_size```. Chunk hashes travel as 16-byte strings.

Only metadata crosses the socket: the server answers STORE_BEGIN / RETRIEVE_BEGIN with arena
offsets, and the worker copies between its own pages and the arena it mapped at REGISTER.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import msgspec

from gpukv.errors import Busy
from gpukv.frontend.messages import (  # noqa: F401 (the messages are part of the protocol)
    MAX_HASHES, Name, Secret, Id, Count, Small, Tokens, Hash, Hashes, PlanId, Layout, Ping,
    Register, Unregister, StoreBegin, StoreCommit, Lookup, RetrieveBegin, RetrieveEnd,
    FreeLookupLocks, EndSession, ReadCounts, BlockHash, ExtraKey, ChunkBlocks, VllmBlocks, Stats,
    Flush)
from gpukv.private_paths import runtime_dir

PROTOCOL_VERSION = 2
MAX_FRAME_BYTES = 8 << 20


def default_address() -> str:
    """``ipc://<runtime folder>/gpukv.sock``: ``$XDG_RUNTIME_DIR/gpukv.sock``, else
    ``/tmp/gpukv-<uid>/gpukv.sock`` (a folder of this user's, mode 0700, so no other user can
    bind the path first), else, when another user holds that folder,
    ``~/.cache/gpukv/run/gpukv.sock`` (:func:`gpukv.private_paths.runtime_dir`)."""
    return f"ipc://{runtime_dir() / 'gpukv.sock'}"


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
