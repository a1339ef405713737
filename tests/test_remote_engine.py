"""CacheEngine with a shared Redis tier: two "machines" (processes) share chunks; faults degrade.

Process A and process B each have their own L1 and their own disk folder; only the redis-server
(real, on 127.0.0.1) is shared. Pages are regenerated from a seed on both sides, so nothing but
the chunks themselves travels between the processes, and only through Redis.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import time
import traceback

import pytest
import torch

if importlib.util.find_spec("redis") is None and os.environ.get("GPUKV_REQUIRE_REDIS") != "1":
    pytest.skip("python package 'redis' not installed (pip install redis hiredis)",
                allow_module_level=True)

from gpukv import CacheEngine, EngineConfig  # noqa: E402

CS = 256
BS = 64  # FlashMLA block size
LAYERS = 3
NUM_BLOCKS = 24
NUM_TOKENS = 512  # two full chunks
MODEL = "dsv3"
SEED = 1234
POISON = -12345  # int16 pattern in the reader's pages before retrieve


def mla_pages(seed: int | None) -> list[torch.Tensor]:
    """Per-layer vLLM MLA pages ``[NB, BS, 576]`` bf16: random bit patterns, or poison."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    pages = []
    for _ in range(LAYERS):
        page = torch.empty(NUM_BLOCKS, BS, 576, dtype=torch.bfloat16)
        if gen is None:
            page.view(torch.int16).fill_(POISON)
        else:
            page.view(torch.int16).copy_(torch.randint(-(1 << 15), 1 << 15, page.shape,
                                                       dtype=torch.int16, generator=gen))
        pages.append(page)
    return pages


def tokens() -> list[int]:
    gen = torch.Generator().manual_seed(SEED + 1)
    return torch.randint(0, 30000, (NUM_TOKENS,), generator=gen).tolist()


def slots(blocks: list[int]) -> torch.Tensor:
    offs = torch.arange(NUM_TOKENS)
    return torch.as_tensor(blocks)[offs // BS] * BS + offs % BS


STORE_SLOTS = slots(list(range(0, NUM_TOKENS // BS)))
READ_SLOTS = slots(list(range(NUM_BLOCKS - 1, NUM_BLOCKS - 1 - NUM_TOKENS // BS, -1)))


def rows(pages: list[torch.Tensor], slot_ids: torch.Tensor) -> list[torch.Tensor]:
    return [page.view(torch.int16).view(-1, 576)[slot_ids] for page in pages]


def engine(remote_url: str | None, disk_dir=None, **kw) -> CacheEngine:
    return CacheEngine(EngineConfig(capacity_bytes=32 << 20, device="cpu", chunk_size=CS,
                                    disk_dir=None if disk_dir is None else str(disk_dir),
                                    remote_url=remote_url, remote_timeout_s=0.5, **kw))


# --------------------------------------------------------------------------- the two machines
def machine_a(url: str, disk_dir: str) -> dict:
    """Stores the MLA prefix (rank 0 of a TP=2 group) and flushes it to disk and Redis."""
    with engine(url, disk_dir) as eng:
        eng.register("a-0", MODEL, mla_pages(SEED), "NB,BS,D", kind="mla", tp_rank=0, tp_size=2)
        assert eng.store("a-0", tokens(), STORE_SLOTS) == NUM_TOKENS
        assert eng.flush(30)
        remote = eng.stats()["tiers"]["remote"]
        assert (remote["stored"], remote["dropped"]) == (2, 0), remote
    return {"stored": remote["stored"]}


def machine_b(url: str, disk_dir: str) -> dict:
    """A TP=2 group on another machine: finds A's chunks remotely, both ranks retrieve them."""
    expected = rows(mla_pages(SEED), STORE_SLOTS)
    with engine(url, disk_dir) as eng:
        pages = [mla_pages(None) for _ in range(2)]
        for rank in range(2):
            eng.register(f"b-{rank}", MODEL, pages[rank], "NB,BS,D", kind="mla", tp_rank=rank,
                         tp_size=2)
        assert len(eng.l1) == 0
        assert eng.lookup(MODEL, tokens(), request_id="R", tp_size=2) == NUM_TOKENS
        stats = eng.stats()
        assert stats["hit_chunks_l1"] == 0 and stats["hit_chunks_tier"] == {"remote": 2}, stats
        assert stats["tiers"]["disk"]["hits"] == 0  # B's own disk never saw these chunks
        assert eng.read_count(MODEL, tokens()) == [2, 2]  # one share per TP rank
        assert len(eng.l1) == 2

        assert eng.retrieve("b-0", tokens(), READ_SLOTS, request_id="R") == NUM_TOKENS
        assert eng.read_count(MODEL, tokens()) == [1, 1]
        assert len(eng.l1) == 2  # rank 1 has not read yet: the temporary objects stay
        assert eng.retrieve("b-1", tokens(), READ_SLOTS, request_id="R") == NUM_TOKENS
        assert len(eng.l1) == 0  # temporary objects left with the second rank's share
        assert eng.free_lookup_locks("R") == 0

        untouched = slots([10] * (NUM_TOKENS // BS))[:BS]  # a block nobody wrote
        for rank in range(2):
            got = rows(pages[rank], READ_SLOTS)
            assert all(torch.equal(g, e) for g, e in zip(got, expected)), f"rank {rank} differs"
            assert all(bool((r == POISON).all()) for r in rows(pages[rank], untouched))
        remote = eng.stats()["tiers"]["remote"]
    return {"remote_hits": remote["hits"], "corrupt": remote["corrupt"]}


def _run(fn, args, results) -> None:
    try:
        results.put(("ok", fn(*args)))
    except BaseException:  # reported to the test in the parent process
        results.put(("error", traceback.format_exc()))


def run_in_process(fn, *args) -> dict:
    """``fn(*args)`` in a fresh spawned interpreter ("another machine"); its failure fails us."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_run, args=(fn, args, results))
    proc.start()
    try:
        status, value = results.get(timeout=180)
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    assert status == "ok", f"{fn.__name__} failed in its process:\n{value}"
    assert proc.exitcode == 0
    return value


@pytest.mark.slow
def test_two_machines_share_an_mla_prefix_through_redis(redis_server, tmp_path):
    assert run_in_process(machine_a, redis_server.url, str(tmp_path / "disk-a")) == {"stored": 2}
    assert len(redis_server.client().keys("gpukv:*")) == 2
    assert run_in_process(machine_b, redis_server.url, str(tmp_path / "disk-b")) == \
        {"remote_hits": 2, "corrupt": 0}


# --------------------------------------------------------------------------- faults, in-process
def _store_prefix(eng: CacheEngine, instance: str = "w-0") -> None:
    eng.register(instance, MODEL, mla_pages(SEED), "NB,BS,D", kind="mla")
    assert eng.store(instance, tokens(), STORE_SLOTS) == NUM_TOKENS
    assert eng.flush(30)


def test_corrupted_remote_value_is_a_miss_and_is_deleted(redis_server):
    with engine(redis_server.url) as writer:
        _store_prefix(writer)
    raw = redis_server.client()
    names = sorted(raw.keys("gpukv:*"))
    assert len(names) == 2
    blob = bytearray(raw.get(names[0]))
    blob[-50] ^= 0x01
    raw.set(names[0], bytes(blob))

    with engine(redis_server.url) as reader:
        reader.register("r-0", MODEL, mla_pages(None), "NB,BS,D", kind="mla")
        found = reader.lookup(MODEL, tokens(), request_id="R")
        # Chunk order is the hash chain; whichever chunk was corrupted ends the prefix there.
        assert found in (0, CS)
        assert reader.stats()["tiers"]["remote"]["corrupt"] == 1
        reader.end_session("R")
        assert reader.flush(10)
    assert raw.exists(names[0]) == 0 and raw.exists(names[1]) == 1


def test_redis_stopped_mid_run_workers_see_no_exception_and_recover(redis_server, tmp_path):
    with engine(redis_server.url, tmp_path / "disk") as eng:
        _store_prefix(eng)
        redis_server.stop()
        # Lookups answer from L1, and after clearing L1 from disk; nothing raises or stalls.
        start = time.monotonic()
        assert eng.lookup(MODEL, tokens(), request_id="R1") == NUM_TOKENS
        eng.end_session("R1")
        eng.clear_l1()
        assert eng.lookup(MODEL, tokens(), request_id="R2") == NUM_TOKENS
        eng.end_session("R2")
        assert eng.stats()["hit_chunks_tier"].get("disk") == 2
        # New stores are kept in L1 and on disk; the remote copies are dropped and counted.
        other = [t + 1 for t in tokens()]
        assert eng.store("w-0", other, STORE_SLOTS) == NUM_TOKENS
        assert eng.flush(30)
        assert time.monotonic() - start < 10  # each remote call costs at most one timeout
        remote = eng.stats()["tiers"]["remote"]
        assert remote["connected"] is False and remote["dropped"] == 2 and remote["stored"] == 2

        redis_server.start()  # same port, empty
        deadline = time.monotonic() + 10
        while not eng.stats()["tiers"]["remote"]["connected"]:
            assert time.monotonic() < deadline, "remote tier did not reconnect"
            time.sleep(0.05)
        third = [t + 2 for t in tokens()]
        assert eng.store("w-0", third, STORE_SLOTS) == NUM_TOKENS
        assert eng.flush(30)
        assert eng.stats()["tiers"]["remote"]["stored"] == 4
    assert len(redis_server.client().keys("gpukv:*")) == 2


def test_slow_remote_never_stalls_a_lookup(redis_server):
    timeout_s, margin_s = 0.5, 1.0
    with engine(redis_server.url) as eng:
        _store_prefix(eng)
        eng.clear_l1()
        redis_server.pause()  # SIGSTOP: the socket stays open, nothing answers
        try:
            start = time.monotonic()
            assert eng.lookup(MODEL, tokens(), request_id="R1") == 0
            assert time.monotonic() - start < timeout_s + margin_s
            skipped = eng.stats()["tiers"]["remote"]["skipped"]
            start = time.monotonic()
            assert eng.lookup(MODEL, tokens(), request_id="R2") == 0
            # marked down: answered without a round trip (counted), so well inside a socket wait
            assert eng.stats()["tiers"]["remote"]["skipped"] == skipped + 1
            assert time.monotonic() - start < timeout_s * 0.9
        finally:
            redis_server.resume()
        eng.end_session("R1")
        eng.end_session("R2")
        deadline = time.monotonic() + 10
        while not eng.stats()["tiers"]["remote"]["connected"]:
            assert time.monotonic() < deadline, "remote tier did not reconnect"
            time.sleep(0.05)
        assert eng.lookup(MODEL, tokens(), request_id="R3") == NUM_TOKENS
        assert eng.stats()["hit_chunks_tier"] == {"remote": 2}


def test_wrong_password_fails_engine_start(redis_factory):
    server = redis_factory(password="s3cret")
    with pytest.raises(ValueError, match="authentication failed"):
        engine(f"redis://:nope@127.0.0.1:{server.port}/0")


def test_a_lookup_through_a_slow_redis_is_one_round_trip(delay_proxy):
    """16 chunks fall through to a Redis answering after 0.3 s per round trip: the lookup costs
    one round trip (was one EXISTS per rank plus one GET per chunk: 5 s at this latency)."""
    chunk_size = NUM_TOKENS // 16
    config = EngineConfig(capacity_bytes=32 << 20, device="cpu", chunk_size=chunk_size,
                          remote_url=delay_proxy.url(), remote_timeout_s=3.0)
    with CacheEngine(config) as eng:
        _store_prefix(eng)
        eng.clear_l1()
        delay_proxy.delay_s = 0.3
        delay_proxy.reset()
        start = time.monotonic()
        assert eng.lookup(MODEL, tokens(), request_id="R") == NUM_TOKENS
        elapsed = time.monotonic() - start
        assert delay_proxy.turns == 1
        assert elapsed < 5.0  # sanity only; the count above is the check
        assert eng.stats()["hit_chunks_tier"] == {"remote": 16}
        pages = mla_pages(None)
        eng.register("r-0", MODEL, pages, "NB,BS,D", kind="mla")
        assert eng.retrieve("r-0", tokens(), READ_SLOTS, request_id="R") == NUM_TOKENS
        expected = rows(mla_pages(SEED), STORE_SLOTS)
        assert all(torch.equal(g, e) for g, e in zip(rows(pages, READ_SLOTS), expected))
        delay_proxy.delay_s = 0.0
