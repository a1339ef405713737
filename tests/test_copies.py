"""The one worker data path (``WorkerCopies``), run against both books: the embedded engine's
in-process core and a ``gpukv serve`` server (in a thread of this process).

Every scenario runs twice, once per books, and asserts the same: two-step copies commit only in
``finish``, a copy that fails after its slots were granted gives them back only after waiting for
what it queued, and a registered tensor whose storage changed is refused before a byte moves.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import gpukv.engine.copy_job as copy_job_module
from frontend_cases import (CHUNK, DIMS, N, RANK_BLOCKS, STORE_BLOCKS, client, kv_cache,
                            mismatched_tokens, prompt, rows, serving, slots_of)
from gpukv.config import EngineConfig
from gpukv.engine.engine import CacheEngine


@contextlib.contextmanager
def books(kind: str, tmp_path):
    """A CacheEngine (local books) or a CacheClient on an in-process server (remote books), and
    the server-side core whose books the test reads."""
    if kind == "local":
        with CacheEngine(EngineConfig(capacity_bytes=8 << 20, device="cpu",
                                      chunk_size=CHUNK)) as engine:
            yield engine, engine.core
    else:
        with serving(tmp_path) as server, client(server.address) as c:
            yield c, server.core


BOOKS = ["local", "remote"]


def held(core) -> int:
    """Objects a copy holds: write slots of a store, pinned objects of a retrieve."""
    stats = core.l1.stats()
    return stats["writing"] + stats["pinned"]


@pytest.mark.parametrize("which", BOOKS)
def test_a_started_store_is_invisible_until_finish_commits_it(which, tmp_path):
    with books(which, tmp_path) as (cache, core):
        pages, tokens = kv_cache("mla", 1), prompt(1)
        cache.register("r0", "m", pages, DIMS["mla"], kind="mla")
        started = cache.start_store("r0", tokens, slots_of(STORE_BLOCKS, len(tokens)))
        assert started.ready()  # CPU: the copy is done when start returns
        assert cache.lookup("m", tokens, request_id="early") == 0  # written, not committed
        assert core.l1.stats()["writing"] == 5  # the five write slots, held for the copy
        assert cache.finish(started) == N
        assert core.l1.stats()["writing"] == 0 and core.l1.stats()["ready"] == 5
        assert cache.lookup("m", tokens, request_id="late") == N
        with pytest.raises(ValueError, match="finished already"):
            cache.finish(started)


@pytest.mark.parametrize("which", BOOKS)
def test_a_started_retrieve_writes_before_finish_and_releases_its_shares_in_finish(which, tmp_path):
    with books(which, tmp_path) as (cache, core):
        pages, tokens = kv_cache("mla", 2), prompt(2)
        cache.register("r0", "m", pages, DIMS["mla"], kind="mla")
        cache.store("r0", tokens, slots_of(STORE_BLOCKS, len(tokens)))
        assert cache.lookup("m", tokens, request_id="q") == N
        dst = slots_of(RANK_BLOCKS[0], N)
        started = cache.start_retrieve("r0", tokens[:N], dst, request_id="q")
        assert core.l1.stats()["shares"] == 5 and core.l1.stats()["pinned"] == 5
        assert mismatched_tokens(rows(pages, "mla", dst), rows(pages, "mla", slots_of(STORE_BLOCKS, N))) == 0
        assert cache.finish(started) == N
        assert core.l1.stats()["shares"] == 0 and core.l1.stats()["pinned"] == 0


@pytest.mark.parametrize("which", BOOKS)
@pytest.mark.parametrize("op", ["pack", "unpack"])
def test_a_copy_that_fails_waits_for_what_it_queued_then_gives_its_slots_back(which, op, tmp_path,
                                                                             monkeypatch):
    with books(which, tmp_path) as (cache, core):
        pages, tokens = kv_cache("mla", 3), prompt(3)
        cache.register("r0", "m", pages, DIMS["mla"], kind="mla")
        if op == "unpack":
            cache.store("r0", tokens, slots_of(STORE_BLOCKS, len(tokens)))
            assert cache.lookup("m", tokens, request_id="q") == N
        events = []
        real_wait = copy_job_module.Fence.wait

        def failing_copy(*args, **kwargs):
            events.append(("copy queued", held(core)))
            raise RuntimeError("launch failed")

        def recording_wait(fence):
            events.append(("waited", held(core)))
            real_wait(fence)

        monkeypatch.setattr(copy_job_module, op, failing_copy)
        monkeypatch.setattr(copy_job_module.Fence, "wait", recording_wait)
        with pytest.raises(RuntimeError, match="launch failed"):
            if op == "pack":
                cache.store("r0", tokens, slots_of(STORE_BLOCKS, len(tokens)))
            else:
                cache.retrieve("r0", tokens[:N], slots_of(RANK_BLOCKS[0], N), request_id="q")
        # the slots stayed pinned until the wait: only then were they given back
        assert events == [("copy queued", 5), ("waited", 5)]
        assert held(core) == 0
        if op == "pack":  # nothing committed: the chunks are absent, the slots free again
            assert core.l1.stats()["objects"] == 0
            monkeypatch.undo()
            assert cache.store("r0", tokens, slots_of(STORE_BLOCKS, len(tokens))) == N


@pytest.mark.parametrize("which", BOOKS)
@pytest.mark.parametrize("op", ["store", "retrieve"])
def test_a_registered_tensor_whose_storage_changed_is_refused_before_any_byte_moves(which, op, tmp_path):
    with books(which, tmp_path) as (cache, core):
        pages, tokens = kv_cache("mla", 4), prompt(4)
        cache.register("r0", "m", pages, DIMS["mla"], kind="mla")
        cache.store("r0", tokens, slots_of(STORE_BLOCKS, len(tokens)))
        assert cache.lookup("m", tokens, request_id="q") == N
        stats = core.l1.stats()
        replacement = torch.zeros_like(pages[1])
        pages[1].set_(replacement)  # the engine re-allocated layer 1 under gpukv
        with pytest.raises(ValueError, match="tensor 1 now lives at .*storage changed"):
            if op == "store":
                cache.store("r0", prompt(5), slots_of(RANK_BLOCKS[1], len(prompt(5))))
            else:
                cache.retrieve("r0", tokens[:N], slots_of(RANK_BLOCKS[0], N), request_id="q")
        assert core.l1.stats() == stats  # no grant was asked for
        assert int(replacement.view(torch.int16).abs().sum()) == 0


@pytest.mark.parametrize("which", BOOKS)
def test_both_books_give_the_same_answers(which, tmp_path):
    with books(which, tmp_path) as (cache, core):
        src, dst = kv_cache("mha", 6), kv_cache("mha", 7)
        tokens = prompt(6)
        cache.register("a", "h", src, DIMS["mha"], kind="mha")
        cache.register("b", "h", dst, DIMS["mha"], kind="mha")
        store_slots = slots_of(STORE_BLOCKS, len(tokens))
        assert cache.store("a", tokens, store_slots) == N
        assert cache.store("a", tokens, store_slots) == 0  # cached already
        holes = store_slots.clone()
        holes[3] = -1  # a chunk with a hole is not stored
        assert cache.store("b", prompt(8), holes) == N - CHUNK
        assert cache.lookup("h", tokens, request_id="q") == N
        read = slots_of(RANK_BLOCKS[0], N)
        read[:CHUNK] = -1  # the engine holds chunk 0: not read
        assert cache.retrieve("b", tokens[:N], read, request_id="q") == N
        assert mismatched_tokens(rows(dst, "mha", read[CHUNK:]), rows(src, "mha", store_slots[CHUNK:N])) == 0
        assert cache.retrieve("b", prompt(9)[:N], read, request_id="q") == 0  # not held: nothing


@pytest.mark.parametrize("which", BOOKS)
def test_chunks_hashed_once_move_like_the_whole_prompt(which, tmp_path):
    """A connector hashes each chunk once (the chain goes on after the last hash it kept) and
    sends only the new chunks' hashes and slots."""
    from gpukv.engine.keys import chunk_hashes, request_seed

    with books(which, tmp_path) as (cache, core):
        pages, tokens = kv_cache("mla", 5), prompt(5)
        cache.register("r0", "m", pages, DIMS["mla"], kind="mla")
        src = slots_of(STORE_BLOCKS, len(tokens))
        assert cache.store("r0", tokens[:2 * CHUNK], src[:2 * CHUNK]) == 2 * CHUNK
        seed = request_seed(cache.copies.books.salt, b"")
        first = chunk_hashes(tokens[:2 * CHUNK], CHUNK, seed=seed)
        rest = chunk_hashes(tokens[2 * CHUNK:N], CHUNK, after=first[-1])
        assert cache.finish(cache.start_store_chunks("r0", rest, src[2 * CHUNK:N])) == 3 * CHUNK
        assert cache.lookup("m", tokens, request_id="q") == N  # the same objects as a whole store
        dst = slots_of(RANK_BLOCKS[0], N)
        got = cache.start_retrieve_chunks("r0", rest, dst[2 * CHUNK:], request_id="q")
        assert cache.finish(got) == 3 * CHUNK
        assert mismatched_tokens(rows(pages, "mla", dst[2 * CHUNK:]), rows(pages, "mla", src[2 * CHUNK:N])) == 0
        with pytest.raises(ValueError, match=r"expected len\(hashes\) \* chunk_size = 48"):
            cache.start_store_chunks("r0", rest, src[:N])


@pytest.mark.parametrize("which", BOOKS)
def test_a_retrieve_queued_layer_by_layer_writes_each_layer_only_when_its_turn_comes(which, tmp_path):
    """begin pins and writes nothing; each copy_layers call writes exactly its layers and fences
    them; finish refuses a copy with layers left; the shares go in finish."""
    from gpukv.engine.keys import chunk_hashes, request_seed

    with books(which, tmp_path) as (cache, core):
        pages, tokens = kv_cache("mla", 7), prompt(7)
        cache.register("r0", "m", pages, DIMS["mla"], kind="mla")
        src = slots_of(STORE_BLOCKS, len(tokens))
        cache.store("r0", tokens, src)
        assert cache.lookup("m", tokens, request_id="q") == N
        hashes = cache.copies.hashes(tokens[:N])
        assert hashes == chunk_hashes(tokens[:N], CHUNK, seed=request_seed(cache.copies.books.salt, b""))
        dst = slots_of(RANK_BLOCKS[0], N)
        want = rows(pages, "mla", src[:N])
        before = rows(pages, "mla", dst)
        copy = cache.begin_retrieve_chunks("r0", hashes, dst, request_id="q")
        assert core.l1.stats()["pinned"] == 5 and copy.layers_queued == 0
        assert [torch.equal(a, b) for a, b in zip(rows(pages, "mla", dst), before)] == [True] * 3
        with pytest.raises(ValueError, match="queued 0 of 3 layers"):
            cache.finish(copy)
        fences = [cache.copy_layers(copy, 1), cache.copy_layers(copy, 2)]
        got = rows(pages, "mla", dst)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert torch.equal(got[2], before[2])  # layer 2's turn has not come
        assert all(f is not None and f.done() for f in fences)  # CPU: the copy is done at once
        with pytest.raises(ValueError, match=r"stop 2 must be in \(2, 3\]"):
            cache.copy_layers(copy, 2)
        cache.copy_layers(copy)
        assert mismatched_tokens(rows(pages, "mla", dst), want) == 0
        assert core.l1.stats()["shares"] == 5  # released in finish only
        assert cache.finish(copy) == N
        assert core.l1.stats()["shares"] == 0 and core.l1.stats()["pinned"] == 0


@pytest.mark.parametrize("which", BOOKS)
def test_an_aborted_copy_gives_its_grant_back_and_commits_nothing(which, tmp_path):
    with books(which, tmp_path) as (cache, core):
        pages, tokens = kv_cache("mha", 8), prompt(8)
        cache.register("r0", "m", pages, DIMS["mha"], kind="mha")
        src = slots_of(STORE_BLOCKS, len(tokens))
        hashes = cache.copies.hashes(tokens)
        store = cache.begin_store_chunks("r0", hashes, src[:N])
        assert core.l1.stats()["writing"] == 5
        cache.copy_layers(store, 1)
        cache.abort(store)  # e.g. the request was preempted before its store was copied
        assert core.l1.stats()["writing"] == 0 and core.l1.stats()["objects"] == 0
        with pytest.raises(ValueError, match="finished already"):
            cache.copy_layers(store)
        assert cache.store("r0", tokens, src) == N  # the slots were given back
        assert cache.lookup("m", tokens, request_id="q") == N
        load = cache.begin_retrieve_chunks("r0", hashes, slots_of(RANK_BLOCKS[0], N), request_id="q")
        assert core.l1.stats()["pinned"] == 5
        cache.abort(load)
        assert core.l1.stats()["pinned"] == 0 and core.l1.stats()["shares"] == 0
