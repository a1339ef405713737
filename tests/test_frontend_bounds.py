"""Bounds under load: other clients' PINGs are answered while a maximal LOOKUP runs, an
over-limit one is refused naming the bound, live clients are not reaped while the server is
loaded, and one client's pipelined STOREs past its bounds get Busy replies while the server's
memory stays bounded and other clients are answered.

One ``gpukv serve`` process for the module (2 s worker timeout: short, with room for a loaded
machine's scheduling delays). A tiny MLA layout (one layer,
8 bf16 per token: 256-byte chunks) lets the arena hold every object of a maximal request.
"""

from __future__ import annotations

import os
import statistics
import threading
import time

import pytest
import torch
import zmq

from frontend_cases import CHUNK, client
from gpukv.errors import Busy
from gpukv.frontend import protocol as p
from gpukv.frontend.process import ServerProcess

TIMEOUT_S = 2.0
MAX = p.MAX_HASHES  # 131072: hashes per request, and objects (hashes x ranks) per call
TINY_CHUNK = CHUNK * 8 * 2  # bytes of one tiny chunk


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bounds")
    with ServerProcess(f"ipc://{tmp}/gpukv.sock", capacity_bytes=MAX * TINY_CHUNK + (8 << 20),
                       device="cpu", chunk_size=CHUNK, worker_timeout_s=TIMEOUT_S) as proc:
        yield proc


def tiny_pages() -> torch.Tensor:
    pages = torch.zeros(1, 64, 16, 8, dtype=torch.bfloat16)  # all layers views of one buffer
    pages.view(torch.int16).random_(-(1 << 15), 1 << 15)
    return pages


@pytest.fixture(scope="module")
def stored(server):
    """The tiny model with MAX chunks stored (two stores: a client process may reserve half
    the arena at once)."""
    with client(server.address, timeout_s=120) as c:
        c.register("tiny", "tiny", [tiny_pages()[0]], "NB,BS,D", kind="mla", tp_size=128)
        tokens = torch.arange(MAX * CHUNK)
        slots = torch.arange(MAX * CHUNK) % (64 * 16)
        half = MAX // 2 * CHUNK
        assert c.store("tiny", tokens[:half], slots[:half]) == half
        assert c.store("tiny", tokens, slots) == MAX * CHUNK - half
        yield c.copies.hashes(tokens)


def raw_socket(address: str):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    return ctx, sock


def rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_ping_is_answered_while_a_maximal_lookup_runs(server, stored):
    with client(server.address, timeout_s=120) as big, client(server.address) as other:
        try:
            # warm-up, not measured: the first maximal requests after the big stores also pay
            # the server's garbage collector walking ~10^6 fresh objects (one pause was 115 ms)
            assert big.lookup_hashes("tiny", stored, request_id="max", tp_size=128) == MAX * CHUNK
            # The concurrency property: PING does not wait for the lookup (~0.15 s of share
            # bookkeeping for 131072 objects x 128 readers, in a pool thread): pings one after
            # another from a second client are answered while each maximal lookup runs. A loop
            # that waited for the lookup would answer at most one or two per lookup. The
            # latency itself (the 50 ms) is a speed goal, measured against an idle
            # server's ping in perf/sweep_ping_under_lookup.py, not timed here.
            overlapped = [_pings_during(big, other, stored) for _ in range(3)]
            assert min(overlapped) >= 3, overlapped
            counts = other.read_counts("tiny", torch.arange(10 * CHUNK))["read_counts"]
            assert counts == [128] * 10  # repeated maximal lookups: topped up, not added
            assert big.free_lookup_locks("max") == MAX * 128
        finally:
            big.end_session("max")


def _pings_during(big, other, hashes) -> int:
    """Pings from ``other`` answered while ``big`` runs one maximal lookup in a thread."""
    done, result = threading.Event(), {}

    def maximal() -> None:  # a client thread; its pinger keeps its session alive
        try:
            result["hits"] = big.lookup_hashes("tiny", hashes, request_id="max", tp_size=128)
        finally:
            done.set()

    thread = threading.Thread(target=maximal)
    thread.start()
    answered = 0
    while not done.is_set():
        other.ping()
        answered += not done.is_set()  # answered before the lookup's reply arrived
    thread.join()
    assert result.get("hits") == MAX * CHUNK, result
    return answered


def test_over_limit_lookups_are_refused_naming_the_bound(server, stored):
    with client(server.address, timeout_s=60) as c:
        extra = stored + [os.urandom(16)]
        with pytest.raises(ValueError, match=rf"\$\.body\.hashes.*{MAX}|{MAX}.*\$\.body\.hashes"):
            c.lookup_hashes("tiny", extra, request_id="over", tp_size=1)
        c.register("mha", "tiny-mha", [torch.zeros(64, 2, 16, 1, 8, dtype=torch.bfloat16)],
                   "NB,2,BS,H,D", kind="mha", tp_size=2)
        with pytest.raises(Busy, match=f"at most {MAX} chunk objects"):
            c.lookup_hashes("tiny-mha", stored, request_id="over", tp_size=2)  # 2 x MAX objects
        assert c.lookup_hashes("tiny-mha", stored[:MAX // 2], request_id="ok", tp_size=2) == 0
        assert c.stats()["open_requests"] == 1  # the refused ones opened nothing
        c.end_session("ok")


def test_live_clients_are_not_reaped_while_the_server_is_loaded(server, stored):
    with client(server.address) as live:  # pings every TIMEOUT_S / 4 from its own thread
        live.register("live", "tiny", [tiny_pages()[0]], "NB,BS,D", kind="mla")
        tokens = torch.arange(10 * CHUNK)
        assert live.lookup("tiny", tokens, request_id="live") == 10 * CHUNK
        before = live.read_count("tiny", tokens)
        errors: list = []

        def load(k: int) -> None:  # maximal lookups back to back, four clients at once
            ctx, sock = raw_socket(server.address)
            try:
                i = 0
                while time.monotonic() < t0 + 2.5 * TIMEOUT_S:  # the scenario: 2.5 timeouts
                    i += 1  # a new session each time: a raw socket does not ping
                    session = os.urandom(16).hex()
                    sock.send(p.encode_request(i + 1, session, p.Lookup("tiny", f"load{k}",
                                                                        stored, tp_size=128)))
                    if not sock.poll(60_000):
                        errors.append("no reply")
                        return
                    reply = p.decode_reply(sock.recv())
                    if not reply.ok and "reaped" not in reply.error:  # raw sockets do not ping
                        errors.append(reply.error)
                    sock.send(p.encode_request(99, session, p.EndSession(f"load{k}")))
                    sock.poll(60_000) and sock.recv()
            finally:
                sock.close()
                ctx.term()

        t0 = time.monotonic()
        threads = [threading.Thread(target=load, args=(k,)) for k in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        loaded_s = time.monotonic() - t0
        assert not errors, errors[:3]
        assert loaded_s > 2.5 * TIMEOUT_S, loaded_s  # the load outlasted the worker timeout
        # the live client kept its session: its request's shares and its instance are there
        assert live.read_count("tiny", tokens) == before
        assert live.free_lookup_locks("live") == 10
        assert live.store("live", tokens, torch.arange(10 * CHUNK)) == 0  # known: all cached


def test_pipelined_stores_past_the_bounds_get_busy_and_memory_stays_bounded(server, stored):
    ctx, sock = raw_socket(server.address)
    session = os.urandom(16).hex()
    layout = p.Layout("mla", "NB,BS,D", "bfloat16", 1, 1, 1, 16, 16, 16, 64)
    k = 40
    noise = os.urandom(16 * MAX * k)
    frames = [p.encode_request(10 + i, session, p.StoreBegin("raw", [
        noise[16 * (MAX * i + j):16 * (MAX * i + j + 1)] for j in range(MAX)])) for i in range(k)]
    try:
        with client(server.address) as other:
            sock.send(p.encode_request(1, session, p.Register("raw", "tiny", layout, 0, 128)))
            assert sock.poll(10_000) and p.decode_reply(sock.recv()).ok
            rss0 = peak = rss_mib(server.pid)
            for f in frames:  # 40 maximal STORE_BEGINs (~90 MiB), never committed
                sock.send(f, copy=False)
            replies, latencies, meanwhile = [], [], 0
            while len(replies) < k:
                t0 = time.perf_counter()
                assert other.ping()["chunk_size"] == CHUNK  # answered meanwhile
                assert other.lookup("tiny", torch.arange(2 * CHUNK), request_id="o") >= 0
                assert len(other.read_count("tiny", torch.arange(2 * CHUNK))) == 2  # pooled
                latencies.append(time.perf_counter() - t0)
                peak = max(peak, rss_mib(server.pid))
                while sock.poll(0):
                    replies.append(p.decode_reply(sock.recv()))
                meanwhile += len(replies) < k  # served while the flood was still being answered
            other.end_session("o")
            kinds = {(r.ok, r.error_type) for r in replies}
            assert kinds <= {(True, ""), (False, "Busy"), (False, "ValueError")}, kinds
            busy = [r.error for r in replies if r.error_type == "Busy"]
            assert len(busy) >= k // 2 and all("at most" in e for e in busy), busy[:3]
            # ValueError: requests still queued when the silent raw session was reaped
            assert all(("reaped" in r.error or "unknown instance 'raw'" in r.error)
                       for r in replies if r.error_type == "ValueError"), \
                {r.error[:90] for r in replies}
            reserved = sum(len(r.value["offsets"]) for r in replies if r.ok) * 256
            assert reserved <= (MAX * TINY_CHUNK + (8 << 20)) // 2  # the reserved-bytes bound
            # Generous bounds (measured here: peak +230-270 MiB; the other client's calls take
            # ~0.2 s at worst, ~3 s with two CPU hogs on the two cores; before the bounds:
            # +3.1 GiB and 18 s stalls). The other client is served while the flood lasts.
            assert peak - rss0 < 768, (rss0, peak)
            assert meanwhile >= 1, (meanwhile, latencies)
            assert max(latencies) < 10.0, (max(latencies), statistics.median(latencies))
            # the silent raw session is reaped (its instance and its unfinished writes go); its
            # never-committed plans stay held while the process that opened them (this one,
            # seen on the socket) runs: it could still write into their slots
            deadline = time.monotonic() + 30
            while other.stats()["l1"]["writing"]:
                assert time.monotonic() < deadline, other.stats()["server"]
                time.sleep(0.1)
            opened = sum(1 for r in replies if r.ok and r.value["plan"])
            assert other.stats()["server"]["orphaned_plans"] == opened
    finally:
        sock.close()
        ctx.term()
