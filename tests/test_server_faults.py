"""Faults: leases follow the client that took them, SIGKILLed and silent clients are reaped, and
hundreds of malformed requests each get an error reply while nothing changes.

One ``gpukv serve`` process for the module, with a 1 s worker timeout.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from pathlib import Path

import msgspec
import pytest
import torch
import zmq

from gpukv.frontend.client import CacheClient, ServerUnavailable
from gpukv.frontend.protocol import PROTOCOL_VERSION, decode_reply
from gpukv.frontend.server import ServerConfig, ServerProcess, check_address
from gpukv.frontend.shm import ShmAllocator
from test_server import (CHUNK, DIMS, LAYERS, NUM_BLOCKS, SHAPES, STORE_BLOCKS, Worker, prompt,
                         slots_of, token_rows)

TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    with ServerProcess(f"ipc://{tmp}/gpukv.sock", capacity_bytes=32 << 20, device="cpu",
                       chunk_size=CHUNK, worker_timeout_s=TIMEOUT_S) as proc:
        yield proc


@pytest.fixture
def owner(server):
    """A well-behaved worker in this process: MLA pages, registered, one prompt stored."""
    with ShmAllocator() as shm, CacheClient(server.address, timeout_s=30) as client:
        pages = [shm.empty(SHAPES["mla"], torch.bfloat16) for _ in range(LAYERS)]
        for layer in pages:
            layer.view(torch.int16).random_(-(1 << 15), 1 << 15)
        yield dict(client=client, pages=pages, shm=shm)


def test_sigkilled_client_loses_exactly_its_own_shares(server, owner):
    other, tokens, model = owner["client"], prompt(100), "m-kill"
    n = len(tokens) // CHUNK * CHUNK
    other.register("other-rank1", model, owner["pages"], DIMS["mla"], kind="mla", tp_rank=1,
                   tp_size=2)
    victim = Worker(server.address)
    try:
        victim("alloc", "v", "mla", seed=7)
        victim("register", "victim-rank0", "v", model, "mla", 0, 2)
        source = victim("rows", "v", "mla", slots_of(STORE_BLOCKS, n))
        store_slots = slots_of(STORE_BLOCKS, len(tokens))
        assert victim("call", "store", "victim-rank0", tokens, store_slots) == n
        # the victim's scheduler takes 2 shares per object, the other client 1
        assert victim("call", "lookup", model, tokens, request_id="v-req", tp_size=2) == n
        assert other.lookup(model, tokens, request_id="o-req", tp_size=1) == n
        assert other.read_count(model, tokens) == [3] * 5
        # shares belong to the client whose LOOKUP took them: another client's free/end of the
        # same request id release only its own (none), and its own lookup adds its own shares
        assert other.free_lookup_locks("v-req") == 0
        other.end_session("v-req")
        assert other.read_count(model, tokens) == [3] * 5
        assert other.lookup(model, tokens, request_id="v-req", tp_size=2) == n
        assert other.read_count(model, tokens) == [5] * 5
        assert other.free_lookup_locks("v-req") == 10
        assert other.read_count(model, tokens) == [3] * 5
        info = victim("info")
        instances = other.stats()["server"]["instances"]
        victim.kill()
    finally:
        victim.close()
    # the other client keeps working while the server notices and reaps the victim
    deadline, calls = time.monotonic() + 10 * TIMEOUT_S + 10, 0
    while other.read_count(model, tokens) != [1] * 5:
        assert time.monotonic() < deadline, other.read_counts(model, tokens)
        assert other.ping()["chunk_size"] == CHUNK
        assert other.lookup(model, prompt(101), request_id=f"probe{calls}", tp_size=2) == 0
        calls += 1
        time.sleep(0.05)
    stats = other.stats()
    assert stats["server"]["instances"] == instances - 1
    assert not any(Path(p).exists() for p in info["shm"])  # the dead worker's files are unlinked
    # the other client's share is untouched: it retrieves bit-exact, then the objects are free
    dst = slots_of([9, 2, 17, 14, 1], n)
    assert other.retrieve("other-rank1", tokens[:n], dst, request_id="o-req") == n
    assert all(torch.equal(token_rows(layer, "mla", dst), src)
               for layer, src in zip(owner["pages"], source))
    counts = other.read_counts(model, tokens)
    assert counts["read_counts"] == [0] * 5 and counts["evictable"] == [True] * 5


def test_silent_client_is_reaped_and_told_so(server, owner):
    live, tokens = owner["client"], prompt(102)
    n = len(tokens) // CHUNK * CHUNK
    live.register("live", "m-silent", owner["pages"], DIMS["mla"], kind="mla")
    assert live.store("live", tokens, slots_of(STORE_BLOCKS, len(tokens))) == n
    with CacheClient(server.address, timeout_s=10, ping_interval_s=0) as silent:
        assert silent.lookup("m-silent", tokens, request_id="s-req", tp_size=4) == n
        assert live.read_count("m-silent", tokens) == [4] * 5
        deadline = time.monotonic() + 10 * TIMEOUT_S + 10
        while live.read_count("m-silent", tokens) != [0] * 5:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        # the reaped client gets a fresh session: its old request is gone, nothing to free
        assert silent.free_lookup_locks("s-req") == 0
        with pytest.raises(ValueError, match="unknown instance 'live'"):  # not its instance
            silent.store("live", tokens, slots_of(STORE_BLOCKS, len(tokens)))


def test_one_client_from_many_threads(server, owner):
    client, tokens = owner["client"], prompt(103)
    n = len(tokens) // CHUNK * CHUNK
    client.register("threads", "m-threads", owner["pages"], DIMS["mla"], kind="mla")
    assert client.store("threads", tokens, slots_of(STORE_BLOCKS, len(tokens))) == n
    errors, results = [], []

    def run(t: int) -> None:
        try:
            for i in range(25):
                results.append(client.lookup("m-threads", tokens, request_id=f"t{t}-{i}",
                                             tp_size=2))
                assert client.free_lookup_locks(f"t{t}-{i}") == 10
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors and results == [n] * 100
    assert client.read_count("m-threads", tokens) == [0] * 5


def test_dead_server_is_an_exception_naming_the_address(tmp_path):
    address = f"ipc://{tmp_path}/nobody.sock"
    t0 = time.monotonic()
    with pytest.raises(ServerUnavailable, match=address):
        CacheClient(address, connect_timeout_s=0.3)
    assert time.monotonic() - t0 < 5


def test_only_loopback_tcp_binds_unless_allowed():
    for address in ("tcp://0.0.0.0:5555", "tcp://10.1.2.3:5555", "tcp://*:5555", "udp://x"):
        with pytest.raises(ValueError, match="address"):
            ServerConfig(address=address)
    assert check_address("tcp://0.0.0.0:5555", allow_remote=True) == "tcp://0.0.0.0:5555"
    assert ServerConfig(address="tcp://127.0.0.1:5555").address.endswith(":5555")


def test_tcp_loopback_server_answers(tmp_path):
    from gpukv.config import EngineConfig
    from gpukv.engine import CacheEngine
    from gpukv.frontend.server import CacheServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = CacheServer(CacheEngine(EngineConfig(capacity_bytes=1 << 20, device="cpu",
                                                  chunk_size=CHUNK)),
                         ServerConfig(address=f"tcp://127.0.0.1:{port}"))
    loop = threading.Thread(target=server.serve_forever)
    loop.start()
    try:
        with CacheClient(f"tcp://127.0.0.1:{port}", timeout_s=10) as client:
            assert client.ping()["chunk_size"] == CHUNK
    finally:
        server.stop()
        loop.join(10)


# ---- malformed requests ------------------------------------------------------------------------
def _frame(body, **envelope) -> bytes:
    return msgspec.msgpack.encode(dict(dict(v=PROTOCOL_VERSION, seq=77, session="raw-client"),
                                       **envelope, body=body))


def _bad_requests(shm_path: str, wrong_mode: str, link: str, tokens: bytes, held: str):
    """(frames, words): each request and a word its error reply must contain."""
    big = NUM_BLOCKS * 16
    past = (torch.arange(len(tokens) // 8) + big).numpy().astype("<i8").tobytes()
    neg = (torch.full((len(tokens) // 8,), -5)).numpy().astype("<i8").tobytes()
    ok_slots = torch.arange(len(tokens) // 8).numpy().astype("<i8").tobytes()
    shm = dict(type="shm", path=shm_path, offset_bytes=0, dtype="bfloat16",
               shape=list(SHAPES["mla"]), stride=list(torch.empty(SHAPES["mla"]).stride()))
    reg = dict(type="register", instance_id="raw", model="m-bad", dims=DIMS["mla"], kind="mla",
               tp_rank=0, tp_size=1, tensors=[shm] * LAYERS)
    cases = [
        (dict(type="store", instance_id="raw", tokens=tokens, slots=past), "slot"),
        (dict(type="store", instance_id="raw", tokens=tokens, slots=neg), "slot"),
        (dict(type="retrieve", instance_id="raw", request_id=held, tokens=tokens, slots=past),
         "slot"),
        (dict(type="retrieve", instance_id="raw", request_id=held, tokens=tokens, slots=neg),
         "slot"),
        (dict(type="retrieve", instance_id="raw", request_id="never-looked-up", tokens=tokens,
              slots=ok_slots), "unknown request"),
        (dict(type="lookup", model="no-such-model", request_id="x", hashes=[b"h" * 16]),
         "unknown model"),
        (dict(type="register", **{k: v for k, v in reg.items() if k != "type"}), "already"),
        (dict(reg, instance_id="r2", tensors=[dict(shm, path="/etc/passwd")]), "/etc/passwd"),
        (dict(reg, instance_id="r2", tensors=[dict(shm, path="/dev/shm/gpukv-1-none")]),
         "No such file"),
        (dict(reg, instance_id="r2", tensors=[dict(shm, path=wrong_mode)]), "mode"),
        (dict(reg, instance_id="r2", tensors=[dict(shm, path=link)]), "cannot open"),
        (dict(reg, instance_id="r2", tensors=[dict(shm, shape=[NUM_BLOCKS * 9, 16, 64])]),
         "needs"),
        (dict(reg, instance_id="r2", tensors=[dict(shm, offset_bytes=1)]), "offset_bytes"),
        (dict(reg, instance_id="r2", dims="NOPE"), "dims"),
        (dict(reg, instance_id="r2", kind="mha"), "kind"),
        (dict(reg, instance_id="r2", tensors=[dict(shm, dtype="float16")] * LAYERS), "differs"),
    ]
    for iid in ("ghost", 12345, "other-rank1"):  # unknown instance ids (or another client's)
        for kind in ("store", "retrieve", "unregister"):
            body = dict(type=kind, instance_id=iid)
            if kind != "unregister":
                body.update(tokens=tokens, slots=ok_slots)
            if kind == "retrieve":
                body["request_id"] = held
            cases.append((body, "unknown instance"))
    numbers = [-1, 0, 129, 1 << 40, -(1 << 63), (1 << 64) - 1, 1.5, "2", None, [], {}, b"\x01"]
    for field in ("tp_size", "num_readers"):
        for value in numbers:
            if value is None and field == "num_readers":
                continue
            cases.append((dict(type="lookup", model="m-bad", request_id="x", hashes=[b"h" * 16],
                               **{field: value}), field))
    for field, values in [("tokens", [b"\x00" * 7, [1, 2], "abc", 5]),
                          ("slots", [b"\x00" * 9, b"\x00" * 8, [0], None]),
                          ("instance_id", [-4, 1.5, None, "", "x" * 300, [1]])]:
        for value in values:
            cases.append((dict(dict(type="store", instance_id="raw", tokens=tokens,
                                    slots=ok_slots), **{field: value}), field))
    for kind in ("register", "unregister", "store", "lookup", "retrieve", "free_lookup_locks",
                 "end_session"):
        cases.append((dict(type=kind), "missing required field"))
        cases.append((dict(type=kind, bogus=1), "bogus" if kind in ("ping",) else "field"))
    for kind in ("LOOKUP", "pickle", "", "exec", 7, None):
        cases.append((dict(type=kind), "type"))
    cases += [(dict(type="ping", extra=True), "extra"), (dict(type="stats", query=5), "query"),
              (dict(type="flush", timeout_s=-3), "timeout_s"),
              (dict(type="stats", query=dict(type="read_counts", model="m")), "exactly one")]
    frames = [(_frame(body), word) for body, word in cases]
    frames += [(_frame(dict(type="ping"), v=v), "version") for v in (0, 2, -1, 99)]
    frames += [(_frame(dict(type="ping"), session=s), "session") for s in ("", 5, None)]
    rng = random.Random(0)
    frames += [(bytes(rng.randrange(256) for _ in range(rng.randrange(0, 120))), "malformed")
               for _ in range(80)]
    frames += [(msgspec.msgpack.encode(x), "malformed") for x in (1, "ping", [1, 2], None, {})]
    valid = _frame(dict(type="store", instance_id="raw", tokens=tokens, slots=ok_slots))
    frames += [(valid[:rng.randrange(1, len(valid) - 1)], "malformed") for _ in range(30)]
    return frames


def test_malformed_requests_each_get_an_error_and_change_nothing(server, owner, tmp_path):
    client, tokens = owner["client"], prompt(104)
    n = len(tokens) // CHUNK * CHUNK
    client.register("other-rank1", "m-bad", owner["pages"], DIMS["mla"], kind="mla")
    assert client.store("other-rank1", tokens, slots_of(STORE_BLOCKS, len(tokens))) == n
    assert client.lookup("m-bad", tokens, request_id="held", tp_size=2) == n
    # the raw client's own pages, registered properly, so slot checks are reached
    raw_pages = owner["shm"].zeros(SHAPES["mla"], torch.bfloat16)
    wrong_mode = owner["shm"].zeros((4,), torch.uint8).untyped_storage().filename
    os.chmod(wrong_mode, 0o644)
    link = f"/dev/shm/gpukv-{os.getpid()}-link{os.getpid()}"
    os.symlink(raw_pages.untyped_storage().filename, link)
    before = client.stats(), client.read_counts("m-bad", tokens)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.address)
    try:
        shm = dict(type="shm", path=raw_pages.untyped_storage().filename, offset_bytes=0,
                   dtype="bfloat16", shape=list(SHAPES["mla"]), stride=list(raw_pages.stride()))
        sock.send(_frame(dict(type="register", instance_id="raw", model="m-bad", dims=DIMS["mla"],
                              kind="mla", tp_rank=0, tp_size=1, tensors=[shm] * LAYERS)))
        assert sock.poll(10_000) and decode_reply(sock.recv()).ok
        cases = _bad_requests(shm["path"], wrong_mode, link,
                              torch.tensor(tokens[:n]).numpy().astype("<i8").tobytes(), "held")
        cases += [([b"a", b"b"], "one frame"), ([b"", b"", b""], "one frame")]
        assert len(cases) >= 200
        for frame, word in cases:
            sock.send_multipart(frame) if isinstance(frame, list) else sock.send(frame)
            assert sock.poll(10_000), f"no reply to {frame[:80]!r}"
            reply = decode_reply(sock.recv())
            assert not reply.ok and reply.error_type in ("ValueError", "TypeError"), reply
            assert word.lower() in reply.error.lower(), (word, reply.error, frame[:200])
        sock.send(_frame(dict(type="ping")))
        assert sock.poll(10_000) and decode_reply(sock.recv()).value["chunk_size"] == CHUNK
        # well-formed, but about another client's request: they release nothing of its shares
        for body, value in ((dict(type="free_lookup_locks", request_id="held"), 0),
                            (dict(type="end_session", request_id="held"), None)):
            sock.send(_frame(body))
            assert sock.poll(10_000) and decode_reply(sock.recv()).value == value
    finally:
        sock.close()
        ctx.term()
        os.unlink(link)
    after = client.stats(), client.read_counts("m-bad", tokens)
    assert after[1] == before[1] and after[1]["read_counts"] == [2] * 5
    for key in ("objects", "used_bytes", "read_locked", "leases", "evictions"):
        assert after[0]["l1"][key] == before[0]["l1"][key], key
    assert after[0]["stored_chunks"] == before[0]["stored_chunks"]
    assert torch.count_nonzero(raw_pages.view(torch.int16)) == 0  # no bad retrieve wrote a byte
    assert client.free_lookup_locks("held") == 10
