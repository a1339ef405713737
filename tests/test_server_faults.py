"""Faults: hundreds of malformed requests each get an error reply while nothing changes; frames
too deep, too large or in too many parts; a worker that tries to shrink or grow the arena it
mapped; workers SIGKILLed in the middle of a copy; silent clients reaped.

A ``gpukv serve`` process for the malformed-input tests (a crash there would be a crash of a
real server); an in-process server with a 1 s worker timeout and an arena of exactly 8 chunk
slots, driven by spawned worker processes, for the copies interrupted by SIGKILL.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import subprocess
import sys
import threading
import time

import msgspec
import pytest
import zmq

from frontend_cases import (CHUNK, DIMS, RANK_BLOCKS, STORE_BLOCKS, N, Worker, chunk_bytes, client,
                            kv_cache, mismatched_tokens, prompt, round_trip_is_exact, rows, secret,
                            serving, slots_of)
from gpukv.frontend.process import ServerProcess
from gpukv.frontend.protocol import MAX_FRAME_BYTES, PROTOCOL_VERSION, decode_reply
from gpukv.frontend.sessions import Limits

TIMEOUT_S = 1.0
SLOTS = 8
SESSION = "raw-client-session-0001"
LAYOUT = dict(kind="mla", dims="NB,BS,D", dtype="bfloat16", num_layers=3, num_kv=1, num_heads=1,
              head_bytes=1152, row_bytes=1152, block_size=16, num_blocks=24)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    with ServerProcess(f"ipc://{tmp}/gpukv.sock", capacity_bytes=8 << 20, device="cpu",
                       chunk_size=CHUNK, worker_timeout_s=TIMEOUT_S) as proc:
        yield proc


@pytest.fixture
def raw(server):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.address)
    yield sock
    sock.close()
    ctx.term()


def frame(body, **envelope) -> bytes:
    return msgspec.msgpack.encode(dict(dict(v=PROTOCOL_VERSION, seq=77, session=SESSION),
                                       **envelope, body=body))


def ask(sock, message, timeout_ms: int = 10_000):
    sock.send_multipart(message) if isinstance(message, list) else sock.send(message)
    assert sock.poll(timeout_ms), f"no reply to {str(message)[:120]}"
    return decode_reply(sock.recv())


def pings(sock) -> bool:
    reply = ask(sock, frame(dict(type="ping")))
    return reply.ok and reply.value["chunk_size"] == CHUNK


# ---- malformed input -------------------------------------------------------------------------
def bad_requests(held: str, other_instance: str, hashes: list[bytes]):
    """(frame, word): each request and a word its error reply must contain."""
    reg = dict(type="register", instance_id="raw", model="m-bad", layout=LAYOUT, tp_rank=0,
               tp_size=1)
    cases = [
        (dict(type="lookup", model="no-such-model", request_id="x", hashes=hashes), "unknown model"),
        (dict(type="retrieve_begin", instance_id="raw", request_id="never-looked-up",
              hashes=hashes), "unknown request"),
        (dict(type="retrieve_begin", instance_id="raw", request_id=held, hashes=hashes),
         "unknown request"),  # another client's request: unknown to this one
        (dict(reg), "already registered"),
        (dict(reg, instance_id="r2", layout=dict(LAYOUT, row_bytes=1000)), "row_bytes"),
        (dict(reg, instance_id="r2", layout=dict(LAYOUT, num_kv=2)), "num_kv"),
        (dict(reg, instance_id="r2", layout=dict(LAYOUT, num_layers=0)), "num_layers"),
        (dict(reg, instance_id="r2", layout=dict(LAYOUT, num_layers=4)), "differs"),
        (dict(reg, instance_id="r2", layout=dict(LAYOUT, dtype="float16")), "differs"),
        (dict(reg, instance_id="r2", layout=dict(LAYOUT, kind="mha")), "num_kv"),
        (dict(reg, instance_id="r2", device="cuda-uuid:GPU-nope"), "no arena for device"),
        (dict(reg, instance_id="r2", device="cpu:7"), "no arena for device"),
        (dict(reg, instance_id="r2", model=" m"), "model"),
        (dict(reg, instance_id="r2", tp_rank=3, tp_size=2), "tp_rank"),
    ]
    for plan in (1, 2, 1 << 40):
        cases += [(dict(type="store_commit", plan=plan), "no WriteGrant"),
                  (dict(type="store_commit", plan=plan, ok=False), "no WriteGrant"),
                  (dict(type="retrieve_end", plan=plan), "no ReadGrant")]
    for iid in ("ghost", 12345, other_instance):  # unknown instance ids (or another client's)
        for kind in ("store_begin", "retrieve_begin", "unregister"):
            body = dict(type=kind, instance_id=iid)
            if kind != "unregister":
                body["hashes"] = hashes
            if kind == "retrieve_begin":
                body["request_id"] = held
            cases.append((body, "unknown instance"))
    numbers = [-1, 0, 129, 1 << 40, -(1 << 63), (1 << 64) - 1, 1.5, "2", None, [], {}, b"\x01", True]
    for field in ("tp_size", "num_readers"):
        for value in numbers:
            if value is None and field == "num_readers":
                continue
            cases.append((dict(type="lookup", model="m-bad", request_id="x", hashes=hashes,
                               **{field: value}), field))
    for field, values in [("hashes", [b"\x00" * 16, [b"short"], [1, 2], "abc", 5, [None]]),
                          ("instance_id", [-4, 1.5, None, "", "x" * 300, [1], {"a": 1}])]:
        for value in values:
            cases.append((dict(dict(type="store_begin", instance_id="raw", hashes=hashes),
                               **{field: value}), field))
    for kind in ("register", "unregister", "store_begin", "store_commit", "lookup",
                 "retrieve_begin", "retrieve_end", "free_lookup_locks", "end_session"):
        cases.append((dict(type=kind), "missing required field"))
        cases.append((dict(type=kind, bogus=1), "field"))
    for kind in ("LOOKUP", "pickle", "", "exec", "store", "retrieve", 7, None):
        cases.append((dict(type=kind), "type"))
    cases += [(dict(type="ping", extra=True), "extra"), (dict(type="stats", query=5), "query"),
              (dict(type="flush", timeout_s=-3), "timeout_s"),
              (dict(type="stats", query=dict(type="read_counts", model="m")), "hashes"),
              (dict(type="free_lookup_locks", request_id="x", start_token=9, end_token=3),
               "end_token")]
    frames = [(frame(body), word) for body, word in cases]
    frames += [(frame(dict(type="ping"), v=v), "version") for v in (0, 1, 3, -1, 99)]
    frames += [(frame(dict(type="ping"), session=s), "session") for s in ("", 5, None, "short")]
    frames += [(frame(dict(type="ping"), group=g), "group") for g in ("", 5, "short")]
    frames += [(b"\x91" * 1024 + b"\xc0", "malformed"),  # 1 KB of nesting
               (frame(dict(type="ping", extra=msgspec.Raw(b"\x91" * 1024 + b"\xc0"))), "nested")]
    rng = random.Random(0)
    frames += [(bytes(rng.randrange(256) for _ in range(rng.randrange(0, 120))), "malformed")
               for _ in range(80)]
    frames += [(msgspec.msgpack.encode(x), "malformed") for x in (1, "ping", [1, 2], None, {})]
    valid = frame(dict(type="store_begin", instance_id="raw", hashes=hashes))
    frames += [(valid[:rng.randrange(1, len(valid) - 1)], "malformed") for _ in range(30)]
    frames += [([b"a", b"b"], "one frame"), ([b"", b"", b""], "one frame")]
    return frames


def test_malformed_requests_each_get_an_error_and_change_nothing(server, raw):
    with client(server.address) as owner:
        pages, tokens = kv_cache("mla", 1), prompt(104)
        owner.register("owner-rank0", "m-bad", pages, DIMS["mla"], kind="mla")
        assert owner.store("owner-rank0", tokens, slots_of(STORE_BLOCKS, len(tokens))) == N
        assert owner.lookup("m-bad", tokens, request_id="held", tp_size=2) == N
        hashes = owner.copies.hashes(tokens)
        assert ask(raw, frame(dict(type="register", instance_id="raw", model="m-bad",
                                   layout=LAYOUT, tp_rank=0, tp_size=1))).ok
        before = owner.stats(), owner.read_counts("m-bad", tokens)
        cases = bad_requests("held", "owner-rank0", hashes)
        assert len(cases) >= 200
        for message, word in cases:
            reply = ask(raw, message)
            assert not reply.ok and reply.error_type in ("ValueError", "TypeError"), reply
            assert word.lower() in reply.error.lower(), (word, reply.error, str(message)[:200])
            assert pings(raw)  # the server keeps serving after every one
        # well-formed, but about another client's request: they release nothing of its shares
        for body, value in ((dict(type="free_lookup_locks", request_id="held"), 0),
                            (dict(type="end_session", request_id="held"), None)):
            reply = ask(raw, frame(body))
            assert reply.ok and reply.value == value
        after = owner.stats(), owner.read_counts("m-bad", tokens)
        assert after[1] == before[1] and after[1]["read_counts"] == [2] * 5
        for key in ("objects", "used_bytes", "read_locked", "shares", "leases", "evictions",
                    "writing", "pinned"):
            assert after[0]["l1"][key] == before[0]["l1"][key], key
        assert after[0]["stored_chunks"] == before[0]["stored_chunks"]
        assert after[0]["server"]["plans"] == 0
        assert owner.free_lookup_locks("held") == 10


def test_an_oversized_frame_is_dropped_and_the_server_goes_on(server, raw):
    big = frame(dict(type="ping")) + b"\x00" * MAX_FRAME_BYTES
    raw.send(big)
    assert not raw.poll(500)  # dropped (zmq closes that connection), never answered
    assert pings(raw)  # the socket reconnects; the server answers
    with client(server.address) as other:
        assert other.ping()["chunk_size"] == CHUNK


def test_the_arena_cannot_be_shrunk_grown_or_unsealed(server, raw):
    reply = ask(raw, frame(dict(type="register", instance_id="seal", model="m-seal", layout=LAYOUT,
                                tp_rank=0, tp_size=1)))
    handle = reply.value["arenas"][0]
    assert handle["kind"] == "memfd" and handle["pid"] == server.pid
    fd = os.open(f"/proc/{handle['pid']}/fd/{handle['fd']}", os.O_RDWR)
    try:
        for attack in (lambda: os.ftruncate(fd, 0), lambda: os.ftruncate(fd, handle["nbytes"] // 2),
                       lambda: os.ftruncate(fd, handle["nbytes"] * 2),
                       lambda: os.pwrite(fd, b"x", handle["nbytes"]),
                       lambda: fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)):
            with pytest.raises(PermissionError) as info:
                attack()
            assert info.value.errno == errno.EPERM
        assert os.fstat(fd).st_size == handle["nbytes"]
    finally:
        os.close(fd)
    assert pings(raw)
    with client(server.address) as c:  # and it still stores and retrieves, bit-exact
        assert round_trip_is_exact(c, "seal2", "m-seal", "mla", 5)


def test_one_client_from_many_threads(server):
    with client(server.address) as c:
        pages, tokens = kv_cache("mla", 3), prompt(103)
        c.register("threads", "m-threads", pages, DIMS["mla"], kind="mla")
        assert c.store("threads", tokens, slots_of(STORE_BLOCKS, len(tokens))) == N
        errors, results = [], []

        def run(t: int) -> None:
            try:
                for i in range(25):
                    results.append(c.lookup("m-threads", tokens, request_id=f"t{t}-{i}", tp_size=2))
                    assert c.free_lookup_locks(f"t{t}-{i}") == 10
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert not errors and results == [N] * 100
        assert c.read_count("m-threads", tokens) == [0] * 5


# ---- workers killed in the middle of a copy (in-process server, worker processes) -------------
@pytest.fixture
def small(tmp_path):
    nbytes = SLOTS * chunk_bytes("mla")
    with serving(tmp_path, capacity_bytes=nbytes, worker_timeout_s=TIMEOUT_S,
                 limits=Limits(max_reserved_bytes=nbytes)) as srv:
        yield srv


def wait_until(predicate, what: str, timeout_s: float = 10 * TIMEOUT_S + 10):
    """Poll an outcome (the reaper runs on its own clock); fails naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_sigkill_mid_store_releases_the_reservation_only_when_the_worker_is_gone(small):
    worker = Worker()
    try:
        worker("connect", small.address)
        worker("alloc", "p", "mla", seed=7)
        worker("register", "w", "p", "m", "mla", 0, 1)
        with client(small.address) as other:
            pages = kv_cache("mla", 8)
            other.register("o", "m", pages, DIMS["mla"], kind="mla")
            tokens, big = prompt(1), prompt(2, SLOTS * CHUNK)
            big_slots = slots_of(list(range(SLOTS)), SLOTS * CHUNK)
            worker("arm", "pack", "after")  # it packs its 5 slots, then stops before the commit
            worker.start("call", "store", "w", tokens, slots_of(STORE_BLOCKS, len(tokens)))
            assert worker.wait_hook() == "pack"
            assert other.store("o", big, big_slots) == (SLOTS - 5) * CHUNK  # never its slots
            assert other.lookup("m", tokens, request_id="early") == 0
            reaped = other.stats()["server"]["reaped"]
            worker.kill()
            wait_until(lambda: other.stats()["server"]["reaped"] > reaped, "the reap")
            wait_until(lambda: other.stats()["server"]["orphaned_plans"] == 0, "the release")
            assert other.ping()["chunk_size"] == CHUNK  # the server keeps serving
            assert other.lookup("m", tokens, request_id="late") == 0  # nothing was committed
            assert other.store("o", big, big_slots) == 5 * CHUNK  # its slots are free now
            assert other.lookup("m", big, request_id="big") == SLOTS * CHUNK
            dst = slots_of(list(range(8, 16)), SLOTS * CHUNK)
            assert other.retrieve("o", big, dst, request_id="big") == SLOTS * CHUNK
            assert mismatched_tokens(rows(pages, "mla", dst), rows(pages, "mla", big_slots)) == 0
            assert other.stats()["l1"]["writing"] == 0
    finally:
        worker.close()


def test_sigkill_mid_retrieve_releases_exactly_its_shares_and_pins(small):
    group = secret("victim")
    worker = Worker()
    try:
        worker("connect", small.address, group=group)
        worker("alloc", "p", "mla", seed=7)
        worker("register", "w", "p", "m", "mla", 0, 2)
        with client(small.address) as other:
            pages = kv_cache("mla", 8)
            other.register("o", "m", pages, DIMS["mla"], kind="mla", tp_rank=1, tp_size=2)
            tokens, big = prompt(1), prompt(2, SLOTS * CHUNK)
            source = worker("rows", "p", "mla", slots_of(STORE_BLOCKS, N))
            assert worker("call", "store", "w", tokens, slots_of(STORE_BLOCKS, len(tokens))) == N
            # the victim's scheduler takes 2 shares per object, the other client 1
            assert worker("call", "lookup", "m", tokens, request_id="v-req", tp_size=2) == N
            assert other.lookup("m", tokens, request_id="o-req") == N
            assert other.read_count("m", tokens) == [3] * 5
            worker("arm", "unpack", "before")  # it pins its 5 objects, then stops
            worker.start("call", "retrieve", "w", tokens[:N], slots_of(RANK_BLOCKS[0], N),
                         request_id="v-req")
            assert worker.wait_hook() == "unpack"
            assert other.stats()["l1"]["pinned"] == 5
            worker.kill()
            # its shares go with its session; its pins once the reaper sees the pid gone
            wait_until(lambda: other.read_count("m", tokens) == [1] * 5, "the victim's shares")
            wait_until(lambda: other.stats()["l1"]["pinned"] == 0, "the victim's pins")
            assert other.stats()["server"]["orphaned_plans"] == 0
            # the other client's share is untouched: it retrieves bit-exact
            dst = slots_of(RANK_BLOCKS[1], N)
            assert other.retrieve("o", tokens[:N], dst, request_id="o-req") == N
            assert mismatched_tokens(rows(pages, "mla", dst), source) == 0
            counts = other.read_counts("m", tokens)
            assert counts["read_counts"] == [0] * 5 and counts["evictable"] == [True] * 5
            # nothing holds the slots any more: a store that needs every slot gets them all
            big_slots = slots_of(list(range(SLOTS)), SLOTS * CHUNK)
            assert other.store("o", big, big_slots) == SLOTS * CHUNK
    finally:
        worker.close()


def test_a_worker_reporting_a_dead_pid_keeps_its_orphans_pinned_until_it_is_gone(small):
    """Issue 24 row 7: a worker says a dead process is its own; reaped mid-store, its plan must
    still stay pinned (the server watches the process it sees on the socket), so the slots it
    wakes up to write are nobody else's. Before: released at the reap, 20/36 chunks wrong."""
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    worker = Worker()
    try:
        worker("lie_about_pid", dead.pid)
        session = worker("connect", small.address, ping_interval_s=0)["session"]
        worker("alloc", "p", "mla", seed=7)
        worker("register", "w", "p", "m", "mla", 0, 1)
        with client(small.address) as other:
            pages = kv_cache("mla", 8)
            other.register("o", "m", pages, DIMS["mla"], kind="mla")
            tokens, big = prompt(1), prompt(2, SLOTS * CHUNK)
            big_slots = slots_of(list(range(SLOTS)), SLOTS * CHUNK)
            worker("arm", "pack", "before")  # it holds its 5 slots, stalls before writing them
            worker.start("call", "store", "w", tokens, slots_of(STORE_BLOCKS, len(tokens)))
            assert worker.wait_hook() == "pack"
            small.sessions.reap(session)  # what the reaper does after its silence
            assert other.stats()["server"]["orphaned_plans"] == 1
            done = (SLOTS - 5) * CHUNK
            assert other.store("o", big, big_slots) == done  # never the stalled worker's slots
            worker.go()  # it wakes up and writes its 5 slots
            with pytest.raises(ValueError, match="reaped"):
                worker.result()
            assert other.lookup("m", big, request_id="q") == done
            dst = slots_of(list(range(8, 16)), SLOTS * CHUNK)
            assert other.retrieve("o", big[:done], dst[:done], request_id="q") == done
            assert mismatched_tokens(rows(pages, "mla", dst[:done]),
                                     rows(pages, "mla", big_slots[:done])) == 0
            assert other.stats()["server"]["orphaned_plans"] == 0  # its late commit gave it back
    finally:
        worker.close()


def test_silent_client_is_reaped_and_told_so(small):
    with client(small.address) as live, client(small.address, ping_interval_s=0) as silent:
        pages, tokens = kv_cache("mla", 4), prompt(102)
        live.register("live", "m-silent", pages, DIMS["mla"], kind="mla")
        silent.register("mine", "m-silent", kv_cache("mla", 5), DIMS["mla"], kind="mla")
        assert live.store("live", tokens, slots_of(STORE_BLOCKS, len(tokens))) == N
        assert silent.lookup("m-silent", tokens, request_id="s-req", tp_size=4) == N
        assert live.read_count("m-silent", tokens) == [4] * 5
        wait_until(lambda: live.read_count("m-silent", tokens) == [0] * 5, "the reap")
        # the reaped client gets a fresh session: its old request and instance are gone
        assert silent.free_lookup_locks("s-req") == 0
        with pytest.raises(ValueError, match="unknown instance 'mine'"):
            silent.store("mine", tokens, slots_of(STORE_BLOCKS, len(tokens)))
        with pytest.raises(ValueError, match="unknown instance 'live'"):  # never another's
            silent.store("live", tokens, slots_of(STORE_BLOCKS, len(tokens)))
        assert live.stats()["instances"] == 1


def test_unlinking_the_socket_file_leaves_connected_clients_served(small):
    with client(small.address) as c:
        path = small.address[len("ipc://"):]
        os.unlink(path)
        assert c.ping()["chunk_size"] == CHUNK
        pages, tokens = kv_cache("mla", 6), prompt(106)
        c.register("u", "m-unlink", pages, DIMS["mla"], kind="mla")
        assert c.store("u", tokens, slots_of(STORE_BLOCKS, len(tokens))) == N
    # the server's shutdown copes with its socket file already gone (the fixture stops it)


def test_tcp_loopback_server_answers(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with serving(tmp_path, address=f"tcp://127.0.0.1:{port}") as srv, client(srv.address) as c:
        assert c.ping()["chunk_size"] == CHUNK
        assert round_trip_is_exact(c, "t", "m-tcp", "mha", 7)
