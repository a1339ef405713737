"""Requests through the server: idempotent lookups, range frees, isolated groups, internal owners.

In-process server (its loop in a thread), clients in this process.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import zmq

import gpukv.frontend.client as client_module
from frontend_cases import (CHUNK, DIMS, RANK_BLOCKS, STORE_BLOCKS, client, kv_cache,
                            mismatched_tokens, one_shot, prompt, rows, secret, serving, slots_of)
from gpukv.frontend import protocol as p

N = 5 * CHUNK


def test_sixteen_lookups_at_tp8_hold_eight_shares_and_range_free_is_exact(tmp_path):
    with serving(tmp_path) as server, client(server.address) as c:
        pages = kv_cache("mla", 1)
        c.register("r0", "ds", pages, DIMS["mla"], kind="mla", tp_size=8)
        tokens = prompt(1)
        assert c.store("r0", tokens, slots_of(STORE_BLOCKS, len(tokens))) == N
        for _ in range(16):  # an engine calls its lookup hook many times per request
            assert c.lookup("ds", tokens, request_id="req", tp_size=8) == N
        assert c.read_count("ds", tokens) == [8] * 5
        # a shorter prefix takes nothing more, and another request still hits
        assert c.lookup("ds", tokens[:2 * CHUNK], request_id="req", tp_size=8) == 2 * CHUNK
        assert c.lookup("ds", tokens, request_id="other", tp_size=8) == N
        assert c.read_count("ds", tokens) == [16] * 5
        assert c.free_lookup_locks("other") == 40
        # [1, 47) holds chunk 1 alone (chunk 0 starts before 1, chunk 2 ends after 47)
        assert c.free_lookup_locks("req", start_token=1, end_token=47) == 8
        assert c.read_count("ds", tokens) == [8, 0, 8, 8, 8]
        assert c.free_lookup_locks("req", start_token=1, end_token=47) == 0  # nothing left there
        assert c.free_lookup_locks("req", start_token=3 * CHUNK, end_token=N) == 16
        assert c.read_count("ds", tokens) == [8, 0, 8, 0, 0]
        # a lookup after the range frees tops the request back up, to 8, not past it
        assert c.lookup("ds", tokens, request_id="req", tp_size=8) == N
        assert c.read_count("ds", tokens) == [8] * 5
        assert c.free_lookup_locks("req", end_token=CHUNK) == 8  # what the engine already had
        dst = slots_of(RANK_BLOCKS[0], N)
        assert c.retrieve("r0", tokens[:N], dst, request_id="req") == N
        assert c.read_count("ds", tokens) == [0, 7, 7, 7, 7]
        assert c.free_lookup_locks("req") == 28
        with pytest.raises(ValueError, match="end_token"):
            c.free_lookup_locks("req", start_token=32, end_token=16)


@pytest.mark.parametrize("request_id", ["spill", "loader", "writer", "gpukv", 0])
def test_internal_owners_cannot_be_named(tmp_path, request_id):
    disk = tmp_path / "disk"
    with serving(tmp_path, disk_dir=disk) as server, client(server.address) as owner, \
            client(server.address, group="spill" * 4) as hostile:
        pages = kv_cache("mla", 1)
        owner.register("w", "m", pages, DIMS["mla"], kind="mla")
        hostile_pages = kv_cache("mla", 2)
        hostile.register(request_id, "m", hostile_pages, DIMS["mla"], kind="mla")
        prompts = [prompt(10 + i) for i in range(6)]
        for i, tokens in enumerate(prompts):
            assert owner.store("w", tokens, slots_of(STORE_BLOCKS, len(tokens))) == N
            # between stores (spills queued or running), the hostile client names the internal
            # owners' roles with every request it can make
            assert hostile.lookup("m", tokens, request_id=request_id) == N
            assert hostile.free_lookup_locks(request_id) == 5
            hostile.end_session(request_id)
            with pytest.raises(ValueError, match="unknown request"):
                hostile.retrieve(request_id, tokens[:N], slots_of(RANK_BLOCKS[0], N),
                                 request_id=request_id)
        assert owner.flush(30) is True
        files = list(Path(disk).rglob("*.safetensors"))
        assert len(files) == 6 * 5
        spill = owner.stats()["spill"]
        assert (spill["spilled"], spill["errors"], spill["dropped"]) == (30, 0, 0)
        # a tier load (the loader's temporary write) under the hostile names: still exact
        assert server.core.l1.clear() == 30
        tokens = prompts[0]
        assert hostile.lookup("m", tokens, request_id=request_id) == N
        for name in {"loader", "spill", "writer"} - {request_id}:
            assert hostile.free_lookup_locks(name) == 0
        dst = slots_of(RANK_BLOCKS[0], N)
        assert hostile.retrieve(request_id, tokens[:N], dst, request_id=request_id) == N
        assert mismatched_tokens(rows(hostile_pages, "mla", dst),
                                 rows(pages, "mla", slots_of(STORE_BLOCKS, N))) == 0


# ---- isolation -----------------------------------------------------------------------------------
def raw_socket(ctx: zmq.Context, address: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    return sock


def raw_call(sock: zmq.Socket, body, session: str, group: str | None = None) -> p.Reply:
    sock.send(p.encode_request(7, session, body, group))
    assert sock.poll(10_000), f"no reply to {body!r}"
    return p.decode_reply(sock.recv())


def test_another_group_cannot_touch_a_request(tmp_path, monkeypatch):
    errors: list[str] = []
    real_call = client_module.CacheClient._call

    def recording_call(self, body, **kwargs):  # every error text any client of this test sees
        try:
            return real_call(self, body, **kwargs)
        except Exception as exc:
            errors.append(str(exc))
            raise

    monkeypatch.setattr(client_module.CacheClient, "_call", recording_call)
    group_a = secret("engine-a")
    with serving(tmp_path) as server, client(server.address, group=group_a) as sched, \
            client(server.address, group=group_a) as rank0, \
            client(server.address, group=group_a) as rank1, client(server.address) as other:
        pages = [kv_cache("mla", 1), kv_cache("mla", 2)]
        for rank, c in enumerate((rank0, rank1)):
            c.register("rank", "m", pages[rank], DIMS["mla"], kind="mla", tp_rank=rank, tp_size=2)
        other.register("rank", "m", kv_cache("mla", 3), DIMS["mla"], kind="mla")  # same id: its own
        tokens = prompt(1)
        source = rows(pages[0], "mla", slots_of(STORE_BLOCKS, N))
        assert rank0.store("rank", tokens, slots_of(STORE_BLOCKS, len(tokens))) == N
        assert rank1.store("rank", tokens, slots_of(STORE_BLOCKS, len(tokens))) == 0  # MLA: once
        assert sched.lookup("m", tokens, request_id="req", tp_size=2) == N
        assert sched.read_count("m", tokens) == [2] * 5
        # another group: its retrieve, free and end of "req" name its own (absent) request
        with pytest.raises(ValueError, match="unknown request 'req'"):
            other.retrieve("rank", tokens[:N], slots_of(RANK_BLOCKS[0], N), request_id="req")
        assert other.free_lookup_locks("req") == 0
        assert other.free_lookup_locks("req", start_token=0, end_token=N) == 0
        other.end_session("req")
        assert sched.read_count("m", tokens) == [2] * 5
        # its own lookup under the same id takes its own shares, and frees only those
        assert other.lookup("m", tokens, request_id="req") == N
        assert sched.read_count("m", tokens) == [3] * 5
        assert other.free_lookup_locks("req") == 5
        with pytest.raises(ValueError, match="unknown instance"):
            other.unregister("nobody")
        # a raw socket inventing sessions (and A's group? it does not know it) touches nothing
        ctx = zmq.Context()
        sock = raw_socket(ctx, server.address)
        try:  # closed whatever happens: a context left to the garbage collector can hang the run
            seen = _probe_from_invented_sessions(sock, monkeypatch, rank0, tokens, errors)
        finally:
            sock.close()
            ctx.term()
        # same group: each worker's retrieve releases one of the scheduler's two shares
        assert seen["during"] == [2] * 5 and seen["after_rank0"] == [1] * 5
        assert rank1.retrieve("rank", tokens[:N], slots_of(RANK_BLOCKS[1], N), request_id="req") == N
        assert sched.read_count("m", tokens) == [0] * 5
        for rank in range(2):
            got = rows(pages[rank], "mla", slots_of(RANK_BLOCKS[rank], N))
            assert mismatched_tokens(got, source) == 0
        secrets = (sched.session, rank0.session, rank1.session, group_a)
    assert len(errors) >= 2 + 3 * 50  # the clients' own and every refused raw request
    leaked = [e for e in errors if any(s in e for s in secrets)]
    assert not leaked, leaked[:3]


def _probe_from_invented_sessions(sock, monkeypatch, rank0, tokens, errors) -> dict:
    """While rank 0's retrieve holds its plan (pins), invented sessions try to end, commit and
    free everything they can name; then both ranks finish their retrieves."""
    seen = {}

    def probe():
        for i in range(50):
            session = os.urandom(16).hex()
            for body in (p.RetrieveEnd(i + 1), p.StoreCommit(i + 1), p.StoreCommit(i + 1, ok=False),
                         p.FreeLookupLocks("req"), p.EndSession("req")):
                reply = raw_call(sock, body, session, group=None if i % 2 else session)
                if not reply.ok:
                    errors.append(reply.error)
                assert reply.value in (None, 0), reply
        seen["during"] = rank0.read_count("m", tokens)

    one_shot(monkeypatch, "unpack", probe)
    assert rank0.retrieve("rank", tokens[:N], slots_of(RANK_BLOCKS[0], N), request_id="req") == N
    seen["after_rank0"] = rank0.read_count("m", tokens)
    return seen
