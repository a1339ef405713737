"""No client can starve another by opening more sessions (issue 24 row 6).

The three attacks of the issue, each against an in-process server: sessions that fill the
server-wide request table, sessions that hold L1 with STORE_BEGINs they never commit, and a
flood of fresh session secrets. Each test fails on the bounds-per-session-only server.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import zmq

from frontend_cases import (CHUNK, DIMS, RANK_BLOCKS, STORE_BLOCKS, chunk_bytes, client,
                            kv_cache, mismatched_tokens, prompt, rows, serving, slots_of)
from gpukv.errors import Busy
from gpukv.frontend import protocol as p
from gpukv.frontend.session import Limits


def raw_call(sock: zmq.Socket, body, session: str) -> p.Reply:
    sock.send(p.encode_request(7, session, body))
    assert sock.poll(10_000), f"no reply to {body!r}"
    return p.decode_reply(sock.recv())


def test_sessions_filling_the_request_table_cannot_starve_a_newcomer(tmp_path):
    """5 sessions open requests until the server-wide table (40) is full and they are Busy; a
    victim's LOOKUP still gets its request (the oldest request of the session holding the most
    ends) and its shares. Before: Busy for the whole read lease."""
    with serving(tmp_path, max_requests=40, limits=Limits(max_open_requests=10)) as server:
        attackers = [client(server.address) for _ in range(5)]
        victim = client(server.address)
        try:
            pages, tokens = kv_cache("mla", 1), prompt(1)
            victim.register("v", "m", pages, DIMS["mla"], kind="mla")
            assert victim.store("v", tokens, slots_of(STORE_BLOCKS, len(tokens))) == 5 * CHUNK
            opened = {}
            for i, a in enumerate(attackers):
                opened[i] = 0
                for r in range(10):
                    try:
                        a.lookup("m", tokens[:CHUNK], request_id=f"a{i}-{r}")
                    except Busy:
                        break
                    opened[i] += 1
            assert victim.stats()["open_requests"] == 40
            with pytest.raises(Busy):  # an attacker at its fair share (40 / 5) gets nothing more
                attackers[0].lookup("m", tokens[:CHUNK], request_id="a0-more")
            assert victim.lookup("m", tokens, request_id="victim") == 5 * CHUNK
            stats = victim.stats()
            assert stats["open_requests"] == 40 and stats["server"]["preempted_requests"] >= 1
            dst = slots_of(RANK_BLOCKS[0], 5 * CHUNK)
            assert victim.retrieve("v", tokens[:5 * CHUNK], dst, request_id="victim") == 5 * CHUNK
            assert mismatched_tokens(rows(pages, "mla", dst),
                                     rows(pages, "mla", slots_of(STORE_BLOCKS, 5 * CHUNK))) == 0
        finally:
            for c in (*attackers, victim):
                c.close()


HOARDER = """
import os, sys, zmq
from gpukv.frontend import protocol as p
sock = zmq.Context().socket(zmq.DEALER)
sock.setsockopt(zmq.LINGER, 0)
sock.connect(sys.argv[1])
layout = p.Layout("mla", "NB,BS,D", "bfloat16", 3, 1, 1, 1152, 1152, 16, 24)
def call(body, sid):
    sock.send(p.encode_request(7, sid, body))
    assert sock.poll(10_000)
    return p.decode_reply(sock.recv())
reserved = 0
for k in range(int(sys.argv[2])):  # sessions that reserve all they may and never commit
    sid = os.urandom(16).hex()
    assert call(p.Register("w", "m", layout, 0, 1, "cpu"), sid).ok
    reply = call(p.StoreBegin("w", [os.urandom(16) for _ in range(16)]), sid)
    reserved += len(reply.value["offsets"]) if reply.ok else 0
print(reserved, flush=True)
sys.stdin.read()  # alive (and able to write its slots) until the test ends
"""


def test_sessions_that_never_commit_cannot_hold_the_arena(tmp_path):
    """Another process opens 3 sessions that STORE_BEGIN as much as they may and never commit;
    a victim still stores its 8 chunks. The bound on bytes in flight is per client process, so
    more sessions give no more. Before (per session, half the arena each): the victim stored
    0/8."""
    with serving(tmp_path, capacity_bytes=32 * chunk_bytes("mla")) as server, \
            client(server.address) as victim:
        hoarder = subprocess.Popen([sys.executable, "-c", HOARDER, server.address, "3"],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert hoarder.stdout.readline().strip() == "16"  # half of the arena in all
            pages, tokens = kv_cache("mla", 2), prompt(2, 8 * CHUNK)
            victim.register("v", "m", pages, DIMS["mla"], kind="mla")
            blocks = list(range(8, 16))  # 8 of the 16 chunks left
            assert victim.store("v", tokens, slots_of(blocks, len(tokens))) == 8 * CHUNK
            assert victim.lookup("m", tokens, request_id="q") == 8 * CHUNK
            dst = slots_of(list(range(16, 24)), 8 * CHUNK)
            assert victim.retrieve("v", tokens, dst, request_id="q") == 8 * CHUNK
            assert mismatched_tokens(rows(pages, "mla", dst),
                                     rows(pages, "mla", slots_of(blocks, 8 * CHUNK))) == 0
        finally:
            hoarder.stdin.close()
            hoarder.wait(30)


def test_fresh_session_secrets_are_capped_and_a_real_client_still_gets_in(tmp_path):
    """A flood of fresh secrets (each a new, empty session) keeps at most
    ``max_sessions_per_process`` of them: the least recently seen empty one makes room. Before:
    every secret kept a session for the worker timeout (150k: +82 MiB)."""
    cap = 256  # Limits().max_sessions_per_process
    with serving(tmp_path) as server:  # the default bounds
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(server.address)
        try:
            for _ in range(2000):
                assert raw_call(sock, p.Ping(), os.urandom(16).hex()).ok
            assert Limits().max_sessions_per_process == cap
            totals = server.sessions.table.totals()
            assert totals["sessions"] == cap and totals.get("evicted") == 2000 - cap
            with client(server.address) as c:  # this process too: it takes an empty one's place
                c.register("w", "m", kv_cache("mla", 1), DIMS["mla"], kind="mla")
                assert c.ping()["chunk_size"] == CHUNK
                assert server.sessions.table.totals()["sessions"] == cap
        finally:
            sock.close()
            ctx.term()


def test_new_sessions_are_refused_only_when_no_session_is_empty(tmp_path):
    with serving(tmp_path, limits=Limits(max_sessions_per_process=2)) as server:
        first, second = client(server.address), client(server.address)
        try:
            for i, c in enumerate((first, second)):  # each holds something: not evictable
                c.register("w", "m", kv_cache("mla", i), DIMS["mla"], kind="mla")
            with pytest.raises(Busy, match=r"at most 2 .*--max-sessions-per-process"):
                client(server.address)
            first.unregister("w")  # empty again: a new client takes its place
            with client(server.address) as third:
                assert third.ping()["chunk_size"] == CHUNK
            assert second.ping()["chunk_size"] == CHUNK  # the one holding an instance stayed
            with pytest.raises(ValueError, match="unknown instance"):
                first.unregister("w")  # (its empty session was closed; the call opens a new one)
        finally:
            first.close()
            second.close()
