"""Sessions and the reaper: a reap that lands in the middle of a request leaks nothing, a
session is reaped only after a whole worker timeout of silence before the loop last caught up,
and a store refused as Busy changes nothing.

In-process server; the reap is injected between a handler's phases by wrapping the core call it
makes (deterministic: no timing involved).
"""

from __future__ import annotations

import time

import pytest

from frontend_cases import (CHUNK, DIMS, RANK_BLOCKS, STORE_BLOCKS, client, kv_cache, prompt,
                            serving, slots_of)

N = 5 * CHUNK


def reap_inside(monkeypatch, core, method: str, when: str, sessions, sid: str) -> None:
    """The next ``core.<method>`` call reaps session ``sid`` (as the reaper thread could) just
    ``before`` or ``after`` it runs."""
    real = getattr(core, method)

    def reaping(*args, **kwargs):
        monkeypatch.setattr(core, method, real)
        if when == "before":
            sessions.reap(sid)
        try:
            return real(*args, **kwargs)
        finally:
            if when == "after":
                sessions.reap(sid)

    monkeypatch.setattr(core, method, reaping)


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("method", ["register", "lookup", "begin_store", "begin_retrieve"])
def test_a_reap_in_the_middle_of_a_request_leaks_nothing(tmp_path, monkeypatch, method, when):
    with serving(tmp_path) as server, client(server.address) as c, client(server.address) as probe:
        core, pages, tokens = server.core, kv_cache("mla", 1), prompt(1)
        store_slots = slots_of(STORE_BLOCKS, len(tokens))
        probe.register("p", "m", kv_cache("mla", 2), DIMS["mla"], kind="mla")
        if method != "register":
            c.register("w", "m", pages, DIMS["mla"], kind="mla", tp_size=2)
            if method == "begin_retrieve":
                assert c.store("w", tokens, store_slots) == N
                assert c.lookup("m", tokens, request_id="req", tp_size=2) == N
        if method == "lookup":
            assert probe.store("p", tokens, store_slots) == N
        reap_inside(monkeypatch, core, method, when, server.sessions, c.session)
        # the request fails clearly: the session is gone (or, reaped before the store began,
        # the instance is)
        with pytest.raises(ValueError, match="reaped|unknown instance 'w'"):
            if method == "register":
                c.register("w", "m", pages, DIMS["mla"], kind="mla")
            elif method == "lookup":
                c.lookup("m", tokens, request_id="req", tp_size=2)
            elif method == "begin_store":
                c.store("w", tokens, store_slots)
            else:
                c.retrieve("w", tokens[:N], slots_of(RANK_BLOCKS[0], N), request_id="req")
        stats = probe.stats()
        assert stats["instances"] == 1  # the probe's alone: the reaped one is not left behind
        assert stats["open_requests"] == 0 and stats["l1"]["shares"] == 0
        assert stats["l1"]["writing"] == 0 and stats["l1"]["pinned"] == 0
        assert stats["server"]["plans"] == 0 and stats["server"]["orphaned_plans"] == 0
        expected_objects = 0 if method in ("register", "begin_store") else 5
        assert stats["l1"]["objects"] == expected_objects
        assert stats["l1"]["used_bytes"] == expected_objects * probe.stats()["models"]["m"]["chunk_bytes"]


def test_reaping_counts_silence_up_to_the_loops_last_drain(tmp_path):
    """The loop keeps ``last_drained``, when it last found its socket empty: every frame sent
    before it was received. A session is reaped only if it was silent for the whole worker
    timeout before that moment, however long the loop has been busy since (its later pings may
    be queued behind the backlog)."""
    timeout = 1.0
    with serving(tmp_path, worker_timeout_s=timeout) as server:
        sessions = server.sessions
        for sid in ("live" * 8, "dead" * 8):
            sessions.touch(sid, None)
        now = time.monotonic()
        drained = now - 10.0  # the loop has been busy for 10 s
        sessions.table.get("live" * 8).last_seen = drained - 0.25 * timeout  # pinged just before
        sessions.table.get("dead" * 8).last_seen = drained - 1.5 * timeout  # silent for longer
        server.last_drained = drained
        server._reap()
        assert "live" * 8 in sessions.table
        assert "dead" * 8 not in sessions.table


def test_a_busy_store_changes_nothing(tmp_path, monkeypatch):
    """A store refused because this client's other stores in flight hold its reserved-bytes
    bound evicts nothing first; one larger than the bound alone stores what fits."""
    from frontend_cases import chunk_bytes, mismatched_tokens, one_shot, rows
    from gpukv.errors import Busy
    from gpukv.frontend.sessions import Limits

    slot = chunk_bytes("mla")
    with serving(tmp_path, capacity_bytes=8 * slot, limits=Limits(max_reserved_bytes=4 * slot)) \
            as server, client(server.address) as owner, client(server.address) as busy:
        pages, other_pages = kv_cache("mla", 1), kv_cache("mla", 2)
        owner.register("o", "m", pages, DIMS["mla"], kind="mla")
        busy.register("b", "m", other_pages, DIMS["mla"], kind="mla")
        kept = prompt(1, 3 * CHUNK)
        assert owner.store("o", kept, slots_of(STORE_BLOCKS, len(kept))) == 3 * CHUNK
        first, second = prompt(2, 4 * CHUNK), prompt(3, 4 * CHUNK)
        seen = {}

        def store_again_while_the_first_is_in_flight():
            with pytest.raises(Busy, match="at most"):
                busy.store("b", second, slots_of(RANK_BLOCKS[1], len(second)))
            seen["objects"] = owner.stats()["l1"]["objects"]

        one_shot(monkeypatch, "pack", store_again_while_the_first_is_in_flight)
        assert busy.store("b", first, slots_of(RANK_BLOCKS[0], len(first))) == 4 * CHUNK
        assert seen["objects"] == 3 + 4  # the owner's 3 chunks and the first store's 4
        assert owner.lookup("m", kept, request_id="kept") == 3 * CHUNK  # nothing was evicted
        dst = slots_of(RANK_BLOCKS[0], 3 * CHUNK)
        assert owner.retrieve("o", kept, dst, request_id="kept") == 3 * CHUNK
        assert mismatched_tokens(rows(pages, "mla", dst),
                                 rows(pages, "mla", slots_of(STORE_BLOCKS, 3 * CHUNK))) == 0
        # one store of 6 chunks, more than the bound (4): it stores 4, reports the rest full
        big = prompt(4, 6 * CHUNK)
        assert busy.store("b", big, slots_of(list(range(12, 18)), len(big))) == 4 * CHUNK
