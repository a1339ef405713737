"""The wire protocol: round trips, strict validation naming the bad field, no pickle."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpukv.frontend.protocol import (PROTOCOL_VERSION, CudaIpcTensor, EndSession, Flush, FreeLookupLocks,
                            Lookup, Ping, ProtocolError, ReadCounts, Register, Retrieve,
                            ShmTensor, Stats, Store, Unregister, decode_reply, decode_request,
                            encode_reply, encode_request, error_reply, ok_reply)

H = b"\x01" * 16
SHM = ShmTensor("/dev/shm/gpukv-1-ab", 0, "bfloat16", [4, 16, 576], [9216, 576, 1])
CUDA = CudaIpcTensor(0, "GPU-1234", b"\x00" * 64, 1 << 20, 0, b"/torch_1_ref", 8, b"\x01" * 64,
                     True, "float8_e4m3fn", [4, 64, 656], [41984, 656, 1], 0)

BODIES = [
    Register("rank0", "deepseek", "NB,BS,D", "mla", 1, 2, [SHM, CUDA]),
    Register(7, "llama", "NB,2,BS,H,D", "mha", 0, 1, [SHM]),
    Unregister("rank0"),
    Store("rank0", b"\x00" * 64, b"\x01" * 64),
    Lookup("deepseek", "req-1", 2, None, hashes=[H, H]),
    Lookup("deepseek", 12, 8, 2, tokens=b"\x00" * 8),
    Retrieve("rank1", "req-1", b"\x00" * 16, b"\x00" * 16),
    FreeLookupLocks("req-1", 2),
    EndSession("req-1"),
    Ping(),
    Stats(),
    Stats(ReadCounts("deepseek", 0, hashes=[H])),
    Flush(1.5),
    Flush(),
]


def raw(body: dict, **envelope) -> bytes:
    return msgspec.msgpack.encode(dict(dict(v=PROTOCOL_VERSION, seq=5, session="s"), **envelope,
                                       body=body))


@pytest.mark.parametrize("body", BODIES, ids=lambda b: type(b).__name__)
def test_every_request_round_trips(body):
    frame = encode_request(41, "session-a", body)
    request = decode_request(frame)
    assert (request.v, request.seq, request.session, request.body) == (
        PROTOCOL_VERSION, 41, "session-a", body)
    assert b"\x80\x04" not in frame[:2]  # msgpack, not a pickle stream


def test_wire_format_is_a_plain_tagged_map():
    decoded = msgspec.msgpack.decode(encode_request(1, "s", FreeLookupLocks("r", 4)))
    assert decoded == dict(v=PROTOCOL_VERSION, seq=1, session="s",
                           body=dict(type="free_lookup_locks", request_id="r", tp_size=4))


@pytest.mark.parametrize("frame, seq, words", [
    (b"", 0, ["malformed", "truncated"]),
    (b"\xc1", 0, ["malformed", "invalid"]),
    (msgspec.msgpack.encode([1, 2, 3]), 0, ["malformed", "object"]),
    (raw(dict(type="lookup", model="m", request_id="r", tp_size=1, hashes=[H]), v=2), 5,
     ["version 2"]),
    (raw(dict(type="launch_missiles")), 5, ["$.body.type"]),
    (raw(dict(type="ping", extra=1)), 5, ["unknown field `extra`"]),
    (raw(dict(type="lookup", model="m", request_id="r", tp_size=0, hashes=[H])), 5,
     ["$.body.tp_size", ">= 1"]),
    (raw(dict(type="lookup", model="m", request_id="r", tp_size=129, hashes=[H])), 5,
     ["$.body.tp_size", "<= 128"]),
    (raw(dict(type="lookup", model="m", request_id="r", tp_size="2", hashes=[H])), 5,
     ["$.body.tp_size", "int"]),
    (raw(dict(type="lookup", model="m", request_id="r", num_readers=0, hashes=[H])), 5,
     ["$.body.num_readers"]),
    (raw(dict(type="lookup", model="m", request_id="r", hashes=[b"short"])), 5,
     ["$.body.hashes[0]"]),
    (raw(dict(type="lookup", model="m", request_id="r")), 5, ["exactly one of tokens and hashes"]),
    (raw(dict(type="lookup", model="m", request_id="r", tokens=b"\0" * 8, hashes=[H])), 5,
     ["exactly one"]),
    (raw(dict(type="lookup", model="", request_id="r", hashes=[H])), 5, ["$.body.model"]),
    (raw(dict(type="lookup", model="m", request_id=-1, hashes=[H])), 5, ["$.body.request_id"]),
    (raw(dict(type="lookup", model="m", request_id=1.5, hashes=[H])), 5, ["$.body.request_id"]),
    (raw(dict(type="store", instance_id="i", tokens=b"\0" * 7, slots=b"\0" * 7)), 5,
     ["tokens", "multiple of 8"]),
    (raw(dict(type="store", instance_id="i", tokens=b"\0" * 16, slots=b"\0" * 8)), 5,
     ["slots has 1 entries for 2 tokens"]),
    (raw(dict(type="store", instance_id="i", tokens=b"\0" * 8)), 5, ["missing", "slots"]),
    (raw(dict(type="retrieve", instance_id="i", tokens=[1, 2], slots=b"", request_id="r")), 5,
     ["$.body.tokens"]),
    (raw(dict(type="register", instance_id="i", model="m", dims="NB,BS,D", kind="gqa", tp_rank=0,
              tp_size=1, tensors=[msgspec.structs.asdict(SHM) | {"type": "shm"}])), 5,
     ["$.body.kind"]),
    (raw(dict(type="register", instance_id="i", model="m", dims="NB,BS,D", kind="mla", tp_rank=2,
              tp_size=2, tensors=[msgspec.structs.asdict(SHM) | {"type": "shm"}])), 5,
     ["tp_rank must be in [0, tp_size=2)"]),
    (raw(dict(type="register", instance_id="i", model="m", dims="NB,BS,D", kind="mla", tp_rank=0,
              tp_size=1, tensors=[])), 5, ["$.body.tensors"]),
    (raw(dict(type="register", instance_id="i", model="m", dims="NB,BS,D", kind="mla", tp_rank=0,
              tp_size=1, tensors=[msgspec.structs.asdict(SHM) | {"type": "shm", "dtype": "obj"}])),
     5, ["$.body.tensors[0].dtype"]),
    (raw(dict(type="register", instance_id="i", model="m", dims="NB,BS,D", kind="mla", tp_rank=0,
              tp_size=1, tensors=[msgspec.structs.asdict(SHM) | {"type": "shm", "stride": [1]}])),
     5, ["shape", "stride", "same length"]),
    (raw(dict(type="register", instance_id="i", model="m", dims="NB,BS,D", kind="mla", tp_rank=0,
              tp_size=1, tensors=[msgspec.structs.asdict(SHM) | {"type": "pickle"}])),
     5, ["$.body.tensors[0].type"]),
    (raw(dict(type="flush", timeout_s=-1.0)), 5, ["$.body.timeout_s"]),
    (raw(dict(type="ping"), session=""), 5, ["$.session"]),
    (raw(dict(type="ping"), seq=-3), 0, ["$.seq"]),
])
def test_bad_frames_are_protocol_errors_naming_the_problem(frame, seq, words):
    with pytest.raises(ProtocolError) as info:
        decode_request(frame)
    assert isinstance(info.value, ValueError)
    assert info.value.seq == seq
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_escape_as_another_exception(frame):
    try:
        decode_request(frame)
    except ProtocolError:
        pass


_json = st.recursive(st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1)
                     | st.floats() | st.text(max_size=8) | st.binary(max_size=20),
                     lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
_types = st.sampled_from(["register", "unregister", "store", "lookup", "retrieve", "ping",
                          "free_lookup_locks", "end_session", "stats", "flush", "nope"])


@settings(max_examples=200, deadline=None)
@given(_types, st.dictionaries(st.sampled_from(
    ["instance_id", "model", "request_id", "tp_size", "num_readers", "tokens", "hashes", "slots",
     "kind", "dims", "tp_rank", "tensors", "query", "timeout_s"]), _json, max_size=6))
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
                      (ProtocolError("p", 4), "ValueError")]:
        reply = decode_reply(encode_reply(error_reply(9, exc)))
        assert (reply.ok, reply.seq, reply.error_type) == (False, 9, kind)
        assert type(exc).__name__ in reply.error
    with pytest.raises(ProtocolError, match="malformed reply"):
        decode_reply(b"\xc1")
