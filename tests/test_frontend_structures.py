"""The session table, the plan book and the handlers on their own (no socket, no server loop).

Narrated scenarios on a tiny CPU core: exact counts of sessions, plans, reserved bytes and
objects after each step.
"""

from __future__ import annotations

import os

import pytest

from frontend_cases import CHUNK, DIMS, chunk_bytes, kv_cache
from gpukv.config import EngineConfig
from gpukv.engine.chunks import describe
from gpukv.engine.core import CacheCore
from gpukv.engine.grants import ReadGrant, WriteGrant
from gpukv.errors import Busy
from gpukv.frontend import protocol as p
from gpukv.frontend.session import Limits
from gpukv.frontend.sessions import Sessions
from gpukv.paged.layout import PagedKV

SID, OTHER = "s" * 32, "o" * 32


@pytest.fixture
def sessions():
    core = CacheCore(EngineConfig(capacity_bytes=16 * chunk_bytes("mla"), device="cpu",
                                  chunk_size=CHUNK), shared=True)
    out = Sessions(core, worker_timeout_s=5.0, limits=Limits(max_plans=2, max_instances=1))
    yield out
    out.close()
    core.close(flush_timeout_s=5)
    for memory in core.memories:
        memory.close()


def register_body(instance: str = "w") -> p.Register:
    paged = PagedKV.from_tensors(kv_cache("mla", 1), DIMS["mla"], kind="mla")
    return p.Register(instance, "m", p.Layout(**describe(paged)), 0, 1, "cpu")


def hashes(n: int, tag: int = 0) -> list[bytes]:
    return [bytes([tag, i]) * 8 for i in range(n)]


def test_table_sessions_groups_and_closing(sessions):
    table = sessions.table
    table.touch(SID, None)
    table.touch(OTHER, "g" * 16)
    assert len(table) == 2 and table.get(SID).group == SID and table.get(OTHER).group == "g" * 16
    with pytest.raises(ValueError, match="another group"):
        table.touch(SID, "g" * 16)
    assert table.get(SID).group == SID  # unchanged
    table.get(SID).last_seen -= 100
    assert table.idle(cutoff=table.get(OTHER).last_seen - 50) == [SID]
    with table.lock:
        closed = table.close_locked(SID)
        assert table.close_locked(SID) is None  # closing is once
    assert closed.closed and SID not in table and table.reaped == 1
    with pytest.raises(ValueError, match="reaped"):
        table.get(SID)
    assert table.totals() == dict(sessions=1, reaped=1, evicted=0, clients=1, requests=0, plans=0)


def test_plan_ids_are_unique_and_a_plan_is_given_back_once(sessions):
    handle = sessions.handle
    for sid in (SID, OTHER):
        sessions.touch(sid, None)
        handle(sid, register_body())
    first = handle(SID, p.StoreBegin("w", hashes(3)))
    second = handle(OTHER, p.StoreBegin("w", hashes(2, tag=1)))
    assert first["plan"] != second["plan"] and len(first["offsets"]) == 3
    s = sessions.table.get(SID)
    assert s.reserved_bytes == 3 * chunk_bytes("mla") and list(s.plans) == [first["plan"]]
    with pytest.raises(ValueError, match=f"no WriteGrant {second['plan']} open"):
        handle(SID, p.StoreCommit(second["plan"]))  # another session's plan: not ours
    with pytest.raises(ValueError, match=f"no ReadGrant {first['plan']} open"):
        handle(SID, p.RetrieveEnd(first["plan"]))  # the wrong kind
    assert handle(SID, p.StoreCommit(first["plan"])) == 3
    assert s.reserved_bytes == 0 and not s.plans
    with pytest.raises(ValueError, match="no WriteGrant"):
        handle(SID, p.StoreCommit(first["plan"]))  # given back once


def test_a_reaped_sessions_plans_are_orphaned_then_a_late_commit_commits_nothing(sessions):
    sessions.touch(SID, None)
    sessions.handle(SID, register_body())
    plan = sessions.handle(SID, p.StoreBegin("w", hashes(4)))["plan"]
    assert sessions.table.get(SID).peers.unverified  # no process observed: held for the hold
    sessions.reap(SID)
    # the instance is gone, so are the objects; their slots stay taken until the plan is back
    assert len(sessions.orphans) == 1 and sessions.core.l1.stats()["objects"] == 0
    assert sessions.core.l1.stats()["used_bytes"] == 4 * chunk_bytes("mla")
    sessions.touch(SID, None)  # the same client comes back (a new, empty session)
    with pytest.raises(ValueError, match="was dropped"):
        sessions.handle(SID, p.StoreCommit(plan))
    assert len(sessions.orphans) == 0
    stats = sessions.core.l1.stats()
    assert stats["objects"] == 0 and stats["used_bytes"] == 0  # nothing readable, slots back


def test_handlers_bound_plans_and_instances(sessions):
    sessions.touch(SID, None)
    sessions.handle(SID, register_body())
    with pytest.raises(Busy, match="--max-instances"):
        sessions.handle(SID, register_body("w2"))
    plans = [sessions.handle(SID, p.StoreBegin("w", hashes(1, tag=t)))["plan"] for t in (1, 2)]
    with pytest.raises(Busy, match="--max-plans"):
        sessions.handle(SID, p.StoreBegin("w", hashes(1, tag=3)))
    assert [type(x) for x in sessions.table.get(SID).plans.values()] == [WriteGrant, WriteGrant]
    for plan in plans:
        sessions.handle(SID, p.StoreCommit(plan))
    assert sessions.handle(SID, p.Lookup("m", "r", hashes(1, tag=1), 1, None)) == CHUNK
    got = sessions.handle(SID, p.RetrieveBegin("w", "r", hashes(1, tag=1)))
    assert isinstance(sessions.table.get(SID).plans[got["plan"]], ReadGrant)
    assert sessions.handle(SID, p.RetrieveEnd(got["plan"])) == 1
    with pytest.raises(ValueError, match="unknown instance 'x' for this client"):
        sessions.handle(SID, p.StoreBegin("x", hashes(1)))


def test_a_full_request_table_ends_the_oldest_request_of_the_biggest_session():
    core = CacheCore(EngineConfig(capacity_bytes=4 * chunk_bytes("mla"), device="cpu",
                                  chunk_size=CHUNK, max_requests=6), shared=True)
    sessions = Sessions(core)
    try:
        for sid in (SID, OTHER, "v" * 32):
            sessions.touch(sid, None)
        sessions.handle(SID, register_body())
        lookup = lambda sid, rid: sessions.handle(sid, p.Lookup("m", rid, hashes(1), 1, None))  # noqa: E731
        for r in range(4):
            lookup(SID, f"big{r}")
        for r in range(2):
            lookup(OTHER, f"small{r}")
        lookup(OTHER, "small2")  # the table is full, but 2 < 6 / 2: the biggest's oldest ends
        assert [r.ident for r in sessions.table.get(SID).requests] == ["big1", "big2", "big3"]
        with pytest.raises(Busy):  # at its fair share (3 of 6, 2 sessions holding): no more
            lookup(OTHER, "small3")
        lookup("v" * 32, "victim")  # 0 < 6 / 3: the oldest of the (first) biggest ends
        assert sessions.handlers.shares.preempted == 2 and len(core.requests) == 6
        assert [r.ident for r in sessions.table.get(SID).requests] == ["big2", "big3"]
        assert len(sessions.table.get(OTHER).requests) == 3
        assert [r.ident for r in sessions.table.get("v" * 32).requests] == ["victim"]
    finally:
        sessions.close()
        core.close(flush_timeout_s=5)
        for memory in core.memories:
            memory.close()


def test_the_reserved_bytes_bound_is_per_client_process_with_a_one_chunk_floor():
    core = CacheCore(EngineConfig(capacity_bytes=16 * chunk_bytes("mla"), device="cpu",
                                  chunk_size=CHUNK), shared=True)
    sessions = Sessions(core, limits=Limits(max_reserved_bytes=1))  # below one chunk
    try:
        for sid in (SID, OTHER):
            sessions.touch(sid, None, os.getpid())  # two sessions of this one process
            sessions.handle(sid, register_body())
        assert sessions.table.get(SID).client is sessions.table.get(OTHER).client
        first = sessions.handle(SID, p.StoreBegin("w", hashes(3)))
        assert len(first["offsets"]) == 1 and first["full"] == 2  # one chunk, though over
        with pytest.raises(Busy, match="this client process has"):
            sessions.handle(OTHER, p.StoreBegin("w", hashes(2, tag=1)))  # same process: no room
        sessions.handle(SID, p.StoreCommit(first["plan"]))
        assert len(sessions.handle(OTHER, p.StoreBegin("w", hashes(2, tag=1)))["offsets"]) == 1
    finally:
        sessions.close()
        core.close(flush_timeout_s=5)
        for memory in core.memories:
            memory.close()
