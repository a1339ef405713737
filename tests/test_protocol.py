"""The wire protocol (v2): round trips, strict validation naming the bad field, no pickle, and
frames no decoder error escapes from (deep nesting, random bytes, oversize)."""

from __future__ import annotations

import re

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpukv.errors import Busy
from gpukv.frontend.protocol import (MAX_FRAME_BYTES, MAX_HASHES, PROTOCOL_VERSION, EndSession,
                                     Flush, FreeLookupLocks, Layout, Lookup, Ping, ProtocolError,
                                     ReadCounts, Register, RetrieveBegin, RetrieveEnd, Stats,
                                     StoreBegin, StoreCommit, Unregister, decode_envelope,
                                     decode_reply, decode_request, encode_reply, encode_request,
                                     error_reply, ok_reply)

H = b"\x01" * 16
SESSION = "s" * 32
MLA = Layout("mla", "NB,BS,D", "bfloat16", 61, 1, 1, 1152, 1152, 64, 4096)
MHA = Layout("mha", "NB,2,BS,H,D", "float16", 32, 2, 8, 256, 2048)

BODIES = [
    Ping(), Ping(1234),
    Register("rank0", "deepseek", MLA, 1, 2, "cuda-uuid:GPU-1234"),
    Register(7, "llama", MHA, 0, 1),
    Unregister("rank0"),
    StoreBegin("rank0", [H, H]),
    StoreCommit(3), StoreCommit(4, ok=False),
    Lookup("deepseek", "req-1", [H, H], 2),
    Lookup("deepseek", 12, [H], 8, 2),
    RetrieveBegin("rank1", "req-1", [H]),
    RetrieveEnd(9),
    FreeLookupLocks("req-1"), FreeLookupLocks("req-1", 16, 64, 2),
    EndSession("req-1"),
    Stats(), Stats(ReadCounts("deepseek", [H], 1)),
    Flush(1.5), Flush(),
]


def raw(body, **envelope) -> bytes:
    return msgspec.msgpack.encode(dict(dict(v=PROTOCOL_VERSION, seq=5, session=SESSION), **envelope,
                                       body=body))


def register(**fields) -> dict:
    layout = msgspec.structs.asdict(MLA)
    return dict(dict(type="register", instance_id="i", model="m", layout=layout, tp_rank=0,
                     tp_size=1), **fields)


@pytest.mark.parametrize("body", BODIES, ids=lambda b: type(b).__name__)
def test_every_request_round_trips(body):
    frame = encode_request(41, SESSION, body, group="g" * 16)
    request = decode_request(frame)
    assert (request.v, request.seq, request.session, request.group, request.body) == (
        PROTOCOL_VERSION, 41, SESSION, "g" * 16, body)
    assert frame[:1] != b"\x80"  # msgpack, not a pickle stream


def test_wire_format_is_a_plain_tagged_map():
    decoded = msgspec.msgpack.decode(encode_request(1, SESSION, FreeLookupLocks("r", 0, 32)))
    assert decoded == dict(v=PROTOCOL_VERSION, seq=1, session=SESSION, group=None,
                           body=dict(type="free_lookup_locks", request_id="r", start_token=0,
                                     end_token=32, tp_size=1))


def nested(depth: int) -> bytes:
    return b"\x91" * depth + b"\xc0"  # [[[...[nil]...]]]: one byte per level


@pytest.mark.parametrize("frame, seq, words", [
    (b"", 0, ["malformed"]),
    (b"\xc1", 0, ["malformed"]),
    (msgspec.msgpack.encode([1, 2, 3]), 0, ["malformed", "object"]),
    (nested(1024), 0, ["malformed"]),
    # the header decoder skips the body: a body nested too deeply fails there (seq unread)
    (raw(dict(type="ping", extra=msgspec.Raw(nested(1000)))), 0, ["nested too deeply"]),
    (raw(dict(type="ping"), v=msgspec.Raw(nested(1000))), 0, ["$.v"]),
    (raw(msgspec.Raw(b"\x81" * 500 + b"\xc0")), 0, ["malformed"]),
    (raw(dict(type="ping"), v=1), 5, ["version 1"]),
    (raw(dict(type="ping"), v=3), 5, ["version 3"]),
    (raw(dict(type="ping"), v="2"), 0, ["malformed", "$.v"]),
    (raw(dict(type="launch_missiles")), 5, ["$.body.type"]),
    (raw(dict(type="ping", extra=1)), 5, ["unknown field `extra`"]),
    (raw(dict(type="ping"), session="short"), 5, ["$.session"]),
    (raw(dict(type="ping"), group="short"), 5, ["$.group"]),
    (raw(dict(type="ping"), seq=-3), 0, ["$.seq"]),
    (raw(dict(type="ping", pid=-1)), 5, ["$.body.pid"]),
    (raw(dict(type="lookup", model="m", request_id="r", tp_size=0, hashes=[H])), 5,
     ["$.body.tp_size", ">= 1"]),
    (raw(dict(type="lookup", model="m", request_id="r", tp_size=129, hashes=[H])), 5,
     ["$.body.tp_size", "<= 128"]),
    (raw(dict(type="lookup", model="m", request_id="r", tp_size="2", hashes=[H])), 5,
     ["$.body.tp_size", "int"]),
    (raw(dict(type="lookup", model="m", request_id="r", tp_size=True, hashes=[H])), 5,
     ["$.body.tp_size"]),
    (raw(dict(type="lookup", model="m", request_id="r", num_readers=0, hashes=[H])), 5,
     ["$.body.num_readers"]),
    (raw(dict(type="lookup", model="m", request_id="r", hashes=[b"short"])), 5,
     ["$.body.hashes[0]"]),
    (raw(dict(type="lookup", model="m", request_id="r", hashes=[H] * (MAX_HASHES + 1))), 5,
     ["$.body.hashes", str(MAX_HASHES)]),
    (raw(dict(type="lookup", model="m", request_id="r")), 5, ["missing required field `hashes`"]),
    (raw(dict(type="lookup", model="", request_id="r", hashes=[H])), 5, ["$.body.model"]),
    (raw(dict(type="lookup", model="m", request_id=-1, hashes=[H])), 5, ["$.body.request_id"]),
    (raw(dict(type="lookup", model="m", request_id=1.5, hashes=[H])), 5, ["$.body.request_id"]),
    (raw(dict(type="lookup", model="m", request_id=["gpukv", "spill"], hashes=[H])), 5,
     ["$.body.request_id"]),
    (raw(dict(type="store_begin", instance_id="i", hashes="abc")), 5, ["$.body.hashes"]),
    (raw(dict(type="store_commit", plan=0)), 5, ["$.body.plan", ">= 1"]),
    (raw(dict(type="store_commit", plan=1, ok="yes")), 5, ["$.body.ok"]),
    (raw(dict(type="retrieve_end", plan=-1)), 5, ["$.body.plan"]),
    (raw(dict(type="free_lookup_locks", request_id="r", start_token=32, end_token=16)), 5,
     ["end_token 16 is before start_token 32"]),
    (raw(dict(type="free_lookup_locks", request_id="r", start_token=-1)), 5,
     ["$.body.start_token"]),
    (raw(register(tp_rank=2, tp_size=2)), 5, ["tp_rank must be in [0, tp_size=2)"]),
    (raw(register(tp_size=True)), 5, ["$.body.tp_size"]),
    (raw(register(layout=dict(msgspec.structs.asdict(MLA), kind="gqa"))), 5,
     ["$.body.layout.kind"]),
    (raw(register(layout=dict(msgspec.structs.asdict(MLA), num_layers=-1))), 5,
     ["$.body.layout.num_layers"]),
    (raw(register(layout=dict(msgspec.structs.asdict(MLA), ptr=1))), 5, ["unknown field `ptr`"]),
    (raw(register(device="x" * 65)), 5, ["$.body.device"]),
    (raw(dict(type="flush", timeout_s=-1.0)), 5, ["$.body.timeout_s"]),
    (raw(dict(type="stats", query=5)), 5, ["$.body.query"]),
])
def test_bad_frames_are_protocol_errors_naming_the_problem(frame, seq, words):
    with pytest.raises(ProtocolError) as info:
        decode_request(frame)
    assert isinstance(info.value, ValueError)
    assert info.value.seq == seq
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_an_oversized_frame_is_refused_before_decoding():
    frame = raw(dict(type="ping")) + b"\x00" * MAX_FRAME_BYTES
    with pytest.raises(ProtocolError, match="over the"):
        decode_request(frame)


def test_a_maximal_request_fits_in_a_frame():
    frame = encode_request(1, SESSION, Lookup("m", "r", [H] * MAX_HASHES, 128))
    assert len(frame) <= MAX_FRAME_BYTES
    assert len(decode_request(frame).body.hashes) == MAX_HASHES


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_escape_as_another_exception(frame):
    try:
        decode_request(frame)
    except ProtocolError:
        pass


_values = st.recursive(st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1)
                       | st.floats() | st.text(max_size=8) | st.binary(max_size=20),
                       lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
_types = st.sampled_from(["ping", "register", "unregister", "store_begin", "store_commit",
                          "lookup", "retrieve_begin", "retrieve_end", "free_lookup_locks",
                          "end_session", "stats", "flush", "nope"])


@settings(max_examples=300, deadline=None)
@given(_types, st.dictionaries(st.sampled_from(
    ["instance_id", "model", "request_id", "tp_size", "num_readers", "hashes", "plan", "ok",
     "layout", "tp_rank", "device", "start_token", "end_token", "query", "timeout_s", "pid"]),
    _values, max_size=6))
def test_random_bodies_decode_or_fail_cleanly(kind, fields):
    try:
        request = decode_request(raw(dict(fields, type=kind)))
    except ProtocolError as exc:
        assert str(exc)
    else:
        assert type(request.body).__struct_config__.tag == kind


def test_replies_round_trip_and_carry_the_error_kind():
    assert decode_reply(encode_reply(ok_reply(3, {"a": [1, 2]}))).value == {"a": [1, 2]}
    for exc, kind in [(ValueError("bad slot 99"), "ValueError"), (KeyError("k"), "RuntimeError"),
                      (TypeError("t"), "TypeError"), (AssertionError(), "RuntimeError"),
                      (ProtocolError("p", 4), "ValueError"), (Busy("busy: full"), "Busy")]:
        reply = decode_reply(encode_reply(error_reply(9, exc)))
        assert (reply.ok, reply.seq, reply.error_type) == (False, 9, kind)
        assert type(exc).__name__ in reply.error
    for frame in (b"\xc1", nested(1024)):
        with pytest.raises(ProtocolError, match="malformed reply"):
            decode_reply(frame)


def test_the_envelope_is_read_without_the_body():
    frame = raw(dict(type="store_begin", instance_id="i", hashes=[b"short"] * 5000), seq=9)
    envelope = decode_envelope(frame)
    assert (envelope.v, envelope.seq, envelope.session, envelope.group) == (
        PROTOCOL_VERSION, 9, SESSION, None)
    with pytest.raises(ProtocolError, match=r"\$.body.hashes\[0\]"):  # the body, decoded later
        decode_request(frame)
    for bad, word in [(raw(dict(type="ping"), session="short"), "$.session"),
                      (raw(dict(type="ping"), v=1), "version 1"),
                      (raw(dict(type="ping"), group=7), "$.group"), (b"\xc1", "malformed")]:
        with pytest.raises(ProtocolError, match=re.escape(word)):
            decode_envelope(bad)
