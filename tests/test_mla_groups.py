"""Where an MLA TP group's objects live: shared by the group and spread over its arenas (capacity
= the sum), or one copy per rank when a rank cannot read the others' arenas. Two CPU arenas
(``cpu:0``, ``cpu:1``) stand for two GPUs; a worker's reachability is what
:func:`gpukv.l1.topology.mla_shared` answers (patched here to simulate a rank that cannot reach).
"""

from __future__ import annotations

import pytest

import gpukv.frontend.remote_books as remote_books
from frontend_cases import (CHUNK, DIMS, RANK_BLOCKS, STORE_BLOCKS, chunk_bytes, client, kv_cache,
                            mismatched_tokens, prompt, rows, secret, serving, slots_of)
from gpukv.frontend.session import Limits


def _owner(h: bytes, n: int) -> int:
    return int.from_bytes(h[:8], "little") % n


def _seed_split_evenly(c, num_chunks: int) -> int:
    """A prompt seed whose ``num_chunks`` chunks land half on each arena."""
    for seed in range(100):
        hashes = c.copies.hashes(prompt(seed, num_chunks * CHUNK))
        if sum(_owner(h, 2) for h in hashes) == num_chunks // 2:
            return seed
    raise AssertionError("no evenly split prompt in 100 seeds")


def test_a_shared_group_holds_the_sum_of_its_arenas(tmp_path):
    slots = 4
    nbytes, group = slots * chunk_bytes("mla"), secret("engine")
    with serving(tmp_path, capacity_bytes=nbytes, devices=("cpu:0", "cpu:1"),
                 limits=Limits(max_reserved_bytes=2 * nbytes)) as server, \
            client(server.address, group=group) as r0, client(server.address, group=group) as r1:
        p0, p1 = kv_cache("mla", 1), kv_cache("mla", 2)
        r0.register("r0", "m", p0, DIMS["mla"], kind="mla", tp_rank=0, tp_size=2, device="cpu:0")
        r1.register("r1", "m", p1, DIMS["mla"], kind="mla", tp_rank=1, tp_size=2, device="cpu:1")
        seed = _seed_split_evenly(r0, 6)
        tokens = prompt(seed, 6 * CHUNK)
        src = slots_of(STORE_BLOCKS, len(tokens))
        # six chunks: more than one arena holds (4), stored once by rank 0 over both arenas
        assert r0.store("r0", tokens, src) == 6 * CHUNK
        assert r1.store("r1", tokens, src) == 0
        devices = r0.stats()["l1"]["devices"]
        assert [d["objects"] for d in devices] == [3, 3] and [d["evictions"] for d in devices] == [0, 0]
        assert r0.lookup("m", tokens, request_id="q", tp_size=2) == 6 * CHUNK
        assert r0.read_count("m", tokens) == [2] * 6  # one object per chunk, a share per rank
        for rank, (c, pages) in enumerate(((r0, p0), (r1, p1))):
            dst = slots_of(RANK_BLOCKS[rank], 6 * CHUNK)
            assert c.retrieve(f"r{rank}", tokens, dst, request_id="q") == 6 * CHUNK
            assert mismatched_tokens(rows(pages, "mla", dst), rows(p0, "mla", src)) == 0
        assert r0.read_count("m", tokens) == [0] * 6


def test_ranks_that_cannot_read_each_other_keep_a_copy_each(tmp_path, monkeypatch):
    monkeypatch.setattr(remote_books, "mla_shared", lambda *args: False)  # e.g. a container per GPU
    group = secret("engine")
    with serving(tmp_path, devices=("cpu:0", "cpu:1")) as server, \
            client(server.address, group=group) as r0, client(server.address, group=group) as r1, \
            client(server.address, group=group) as sched:
        p0, p1 = kv_cache("mla", 1), kv_cache("mla", 2)
        r0.register("r0", "m", p0, DIMS["mla"], kind="mla", tp_rank=0, tp_size=2, device="cpu:0")
        r1.register("r1", "m", p1, DIMS["mla"], kind="mla", tp_rank=1, tp_size=2, device="cpu:1")
        tokens = prompt(3)
        n = len(tokens) // CHUNK * CHUNK
        src = slots_of(STORE_BLOCKS, len(tokens))
        assert r0.store("r0", tokens, src) == n
        assert sched.lookup("m", tokens, request_id="q", tp_size=2) == 0  # rank 1 has no copy yet
        assert r1.store("r1", tokens, src) == n  # each rank stores its own, in its own arena
        assert [d["objects"] for d in sched.stats()["l1"]["devices"]] == [n // CHUNK] * 2
        assert sched.lookup("m", tokens, request_id="q", tp_size=2) == n
        for rank in (0, 1):  # one share on each rank's own object
            assert sched.read_count("m", tokens, kv_rank=rank) == [1] * (n // CHUNK)
        for rank, (c, pages) in enumerate(((r0, p0), (r1, p1))):
            dst = slots_of(RANK_BLOCKS[rank], n)
            assert c.retrieve(f"r{rank}", tokens[:n], dst, request_id="q") == n
            assert mismatched_tokens(rows(pages, "mla", dst), rows(pages, "mla", src[:n])) == 0
        assert sched.read_count("m", tokens, kv_rank=1) == [0] * (n // CHUNK)


def test_a_group_whose_ranks_disagree_never_shares_objects(tmp_path, monkeypatch):
    with serving(tmp_path, devices=("cpu:0", "cpu:1")) as server, \
            client(server.address) as r0, client(server.address) as r1:
        r0.register("r0", "m", kv_cache("mla", 1), DIMS["mla"], kind="mla", tp_rank=0, tp_size=2,
                    device="cpu:0")
        monkeypatch.setattr(remote_books, "mla_shared", lambda *args: False)
        with pytest.raises(ValueError, match="objects=per-rank.*objects=shared"):
            r1.register("r1", "m", kv_cache("mla", 2), DIMS["mla"], kind="mla", tp_rank=1,
                        tp_size=2, device="cpu:1")
        assert not r1.copies.registered("r1")  # that rank runs uncached (the connector logs it)
