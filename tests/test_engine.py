"""The embedded engine: store / lookup / retrieve with MLA reader shares, MHA shards, disk hits.

Narrated scenarios on CPU with small vLLM-shaped paged caches (MLA ``NB,BS,D`` 576-wide bf16,
MHA blocks-first ``NB,2,BS,H,D``).
"""

import logging

import pytest
import torch

from gpukv import CacheEngine, EngineConfig
from gpukv.l1 import Status
from gpukv.demo import make_pages, token_rows

CS = 256
LAYERS = 3


def _slots(blocks, block_size, num_tokens):
    offs = torch.arange(num_tokens)
    return torch.as_tensor(blocks)[offs // block_size] * block_size + offs % block_size


def _engine(tmp_path=None, **kw):
    cfg = dict(capacity_bytes=64 << 20, device="cpu", chunk_size=CS)
    if tmp_path is not None:
        cfg["disk_dir"] = str(tmp_path / "disk")
    cfg.update(kw)
    return CacheEngine(EngineConfig(**cfg))


class MLAGroup:
    """Two TP ranks of a DeepSeek-like MLA model, each with its own pages (block size 64)."""

    def __init__(self, engine, tp=2, num_tokens=512, seed=0):
        self.engine, self.tp = engine, tp
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.pages = [make_pages("mla", LAYERS, 24, tp, "cpu") for _ in range(tp)]
        self.tokens = torch.randint(0, 30000, (num_tokens,), generator=gen).tolist()
        nb = num_tokens // 64
        self.store_slots = _slots(range(0, nb), 64, num_tokens)
        self.read_slots = _slots(range(23, 23 - nb, -1), 64, num_tokens)  # other blocks, reversed
        for r in range(tp):
            engine.register(f"mla-{r}", "dsv3", self.pages[r], "NB,BS,D", kind="mla", tp_rank=r, tp_size=tp)

    def rows(self, rank, slots):
        return [token_rows(layer, "mla", slots).view(torch.int16) for layer in self.pages[rank]]

    def assert_retrieved(self):
        """Each rank's read slots hold, bit for bit, what rank 0 stored."""
        expected = self.rows(0, self.store_slots)
        for rank in range(self.tp):
            assert all(torch.equal(a, b) for a, b in zip(self.rows(rank, self.read_slots), expected))

    def keys(self):
        return [k for k, _ in self.engine.object_keys("dsv3", self.tokens)]

    def tier_keys(self):
        return [t for _, t in self.engine.object_keys("dsv3", self.tokens)]


def test_mla_tp2_lookup_takes_two_shares_each_rank_releases_one():
    engine = _engine()
    g = MLAGroup(engine)
    assert engine.store("mla-0", g.tokens, g.store_slots) == 512
    assert engine.store("mla-1", g.tokens, g.store_slots) == 0  # one object serves the TP group
    assert engine.lookup("dsv3", g.tokens, request_id="R", tp_size=2) == 512
    assert engine.read_count("dsv3", g.tokens) == [2, 2]
    assert engine.retrieve("mla-0", g.tokens, g.read_slots, request_id="R") == 512
    assert engine.read_count("dsv3", g.tokens) == [1, 1]
    assert all(k in engine.l1 for k in g.keys())  # still readable for rank 1
    assert engine.retrieve("mla-1", g.tokens, g.read_slots, request_id="R") == 512
    assert engine.read_count("dsv3", g.tokens) == [0, 0]
    g.assert_retrieved()
    assert engine.free_lookup_locks("R") == 0


def test_mla_tp2_from_disk_after_l1_cleared_temporary_objects_leave(tmp_path):
    engine = _engine(tmp_path)
    g = MLAGroup(engine)
    engine.store("mla-0", g.tokens, g.store_slots)
    assert engine.flush(30)
    assert engine.clear_l1() == 2 and len(engine.l1) == 0
    assert engine.lookup("dsv3", g.tokens, request_id="R", tp_size=2) == 512
    assert engine.stats()["hit_chunks_tier"] == {"disk": 2}
    assert engine.read_count("dsv3", g.tokens) == [2, 2]
    assert engine.retrieve("mla-0", g.tokens, g.read_slots, request_id="R") == 512
    assert engine.read_count("dsv3", g.tokens) == [1, 1] and len(engine.l1) == 2
    assert engine.retrieve("mla-1", g.tokens, g.read_slots, request_id="R") == 512
    assert len(engine.l1) == 0 and engine.l1.used_bytes == 0  # temporary objects freed
    g.assert_retrieved()
    engine.close()


def test_warm_restart_on_the_same_disk_dir(tmp_path):
    engine = _engine(tmp_path)
    g = MLAGroup(engine)
    engine.store("mla-0", g.tokens, g.store_slots)
    engine.flush(30)
    engine.close()
    engine2 = _engine(tmp_path)
    for r in range(2):
        engine2.register(f"mla-{r}", "dsv3", g.pages[r], "NB,BS,D", kind="mla", tp_rank=r, tp_size=2)
    assert engine2.lookup("dsv3", g.tokens, request_id="R2", tp_size=2) == 512
    for r in range(2):
        assert engine2.retrieve(f"mla-{r}", g.tokens, g.read_slots, request_id="R2") == 512
    g.assert_retrieved()
    engine2.close()


def test_corrupted_disk_chunk_is_a_miss_and_never_reaches_pages(tmp_path):
    engine = _engine(tmp_path)
    g = MLAGroup(engine)
    engine.store("mla-0", g.tokens, g.store_slots)
    engine.flush(30)
    engine.clear_l1()
    disk = engine.tiers[0]
    name = disk._file_name(g.tier_keys()[1])
    path = disk.root / name[:2] / name
    blob = bytearray(path.read_bytes())
    blob[-3] ^= 0x01
    path.write_bytes(bytes(blob))
    assert engine.lookup("dsv3", g.tokens, request_id="R", tp_size=2) == 256  # chunk 1 is a miss
    before = [p.clone() for p in g.pages[1]]
    assert engine.retrieve("mla-1", g.tokens, g.read_slots, request_id="R") == 0  # all-or-nothing
    assert all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(g.pages[1], before))
    assert not path.exists()
    engine.close()


def test_mha_tp2_each_rank_stores_and_retrieves_its_own_shard():
    engine = _engine()
    torch.manual_seed(1)
    pages = [make_pages("mha", LAYERS, 64, 2, "cpu") for _ in range(2)]
    tokens = list(range(1000, 1512))
    store_slots = _slots(range(0, 32), 16, 512)
    read_slots = _slots(range(63, 31, -1), 16, 512)
    for r in range(2):
        engine.register(f"mha-{r}", "llama", pages[r], "NB,2,BS,H,D", kind="mha", tp_rank=r, tp_size=2)
    assert [engine.store(f"mha-{r}", tokens, store_slots) for r in range(2)] == [512, 512]
    assert engine.lookup("llama", tokens, request_id="R", tp_size=2) == 512
    assert [engine.read_count("llama", tokens, kv_rank=r) for r in range(2)] == [[1, 1], [1, 1]]
    for r in range(2):
        assert engine.retrieve(f"mha-{r}", tokens, read_slots, request_id="R") == 512
        assert engine.read_count("llama", tokens, kv_rank=r) == [0, 0]
        for layer in pages[r]:
            assert torch.equal(token_rows(layer, "mha", read_slots).view(torch.int16),
                               token_rows(layer, "mha", store_slots).view(torch.int16))
    # the shards differ: rank 1 did not get rank 0's bytes
    assert not torch.equal(token_rows(pages[0][0], "mha", read_slots), token_rows(pages[1][0], "mha", read_slots))


def test_mha_lookup_needs_every_rank_shard():
    engine = _engine()
    pages = [make_pages("mha", LAYERS, 64, 2, "cpu") for _ in range(2)]
    tokens = list(range(512))
    for r in range(2):
        engine.register(f"mha-{r}", "llama", pages[r], "NB,2,BS,H,D", kind="mha", tp_rank=r, tp_size=2)
    engine.store("mha-0", tokens, _slots(range(32), 16, 512))  # rank 1 never stored
    assert engine.lookup("llama", tokens, request_id="R", tp_size=2) == 0
    assert engine.read_count("llama", tokens, kv_rank=0) == [0, 0]


def test_lookup_stops_at_first_miss_and_does_not_lock_later_chunks():
    engine = _engine()
    g = MLAGroup(engine, num_tokens=1024)
    engine.store("mla-0", g.tokens, g.store_slots)
    assert engine.l1.delete([g.keys()[2]]) == [Status.OK]
    assert engine.lookup("dsv3", g.tokens, request_id="R", tp_size=2) == 512
    counts = engine.read_count("dsv3", g.tokens)
    assert counts[:2] == [2, 2] and counts[3] == 0


def test_num_readers_overrides_tp_size_and_free_releases_exactly_what_is_held():
    engine = _engine()
    g = MLAGroup(engine)
    engine.store("mla-0", g.tokens, g.store_slots)
    assert engine.lookup("dsv3", g.tokens, request_id="A", tp_size=8, num_readers=3) == 512
    assert engine.lookup("dsv3", g.tokens, request_id="B", tp_size=2) == 512
    assert engine.read_count("dsv3", g.tokens) == [5, 5]
    assert engine.retrieve("mla-0", g.tokens, g.read_slots, request_id="A") == 512
    assert engine.free_lookup_locks("A") == 4  # 2 objects x 2 remaining shares
    assert engine.free_lookup_locks("A") == 0
    assert engine.read_count("dsv3", g.tokens) == [2, 2]  # B untouched
    engine.end_session("B")
    assert engine.read_count("dsv3", g.tokens) == [0, 0]


def test_retrieve_with_a_missing_chunk_writes_nothing():
    engine = _engine()
    g = MLAGroup(engine)
    engine.store("mla-0", g.tokens, g.store_slots)
    engine.lookup("dsv3", g.tokens, request_id="R", tp_size=2)
    longer = g.tokens + list(range(256))  # a third chunk nobody stored
    slots = torch.cat([g.read_slots, _slots(range(8, 12), 64, 256)])
    before = [p.clone() for p in g.pages[1]]
    assert engine.retrieve("mla-1", longer, slots, request_id="R") == 0
    assert all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(g.pages[1], before))
    assert engine.read_count("dsv3", g.tokens) == [2, 2]  # nothing released by the failed call


def test_store_out_of_memory_keeps_the_prefix_that_fits():
    engine = _engine(capacity_bytes=2 * LAYERS * CS * 1152)
    g = MLAGroup(engine, num_tokens=1024)
    assert engine.store("mla-0", g.tokens, g.store_slots) == 512
    assert engine.lookup("dsv3", g.tokens, request_id="R", tp_size=1) == 512


def test_log_lines(caplog):
    engine = _engine()
    g = MLAGroup(engine)
    with caplog.at_level(logging.DEBUG, logger="gpukv.engine.copy_job"):
        engine.store("mla-0", g.tokens, g.store_slots)
        engine.lookup("dsv3", g.tokens, request_id="R", tp_size=2)
        engine.retrieve("mla-0", g.tokens, g.read_slots, request_id="R")
    # copies, like lookups, are the hot path: one DEBUG line each, nothing at INFO
    assert not [r for r in caplog.records if r.levelno >= logging.INFO]
    copies = [r.getMessage() for r in caplog.records if r.name == "gpukv.engine.copy_job"]
    assert [m.split(" in ")[0] for m in copies] == ["store: 512 tokens", "retrieve: 512 tokens"]
    assert all("GB/s)" in m for m in copies)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="gpukv.engine.core"):
        engine.lookup("dsv3", g.tokens, request_id="R", tp_size=2)
    assert "Lookup 'R': 2/2 prefix chunks (2 L1" in caplog.text


def test_bad_input_raises_and_changes_nothing():
    engine = _engine()
    g = MLAGroup(engine)
    engine.store("mla-0", g.tokens, g.store_slots)
    with pytest.raises(ValueError, match="unknown request 'nope'"):
        engine.retrieve("mla-0", g.tokens, g.read_slots, request_id="nope")
    with pytest.raises(ValueError, match="unknown instance 'ghost'"):
        engine.store("ghost", g.tokens, g.store_slots)
    with pytest.raises(ValueError, match=r"slot_mapping has 511 entries, expected one per token \(512\)"):
        engine.store("mla-0", g.tokens, g.store_slots[:511])
    engine.lookup("dsv3", g.tokens, request_id="L", tp_size=2)
    with pytest.raises(ValueError, match=r"slot_mapping entry 2535 is past the cache \(1536 slots"):
        engine.retrieve("mla-1", g.tokens, g.read_slots + 1000, request_id="L")
    assert engine.read_count("dsv3", g.tokens) == [2, 2]  # the bad retrieve took and released nothing
    engine.end_session("L")
    with pytest.raises(ValueError, match="tp_size"):
        engine.lookup("dsv3", g.tokens, request_id="X", tp_size=0)
    with pytest.raises(ValueError, match="num_readers"):
        engine.lookup("dsv3", g.tokens, request_id="X", tp_size=2, num_readers=129)
    with pytest.raises(ValueError, match="unknown model 'other'"):
        engine.lookup("other", g.tokens, request_id="X")
    with pytest.raises(ValueError, match="already registered"):
        engine.register("mla-0", "dsv3", g.pages[0], "NB,BS,D", kind="mla")
    with pytest.raises(ValueError, match="tp_rank"):
        engine.register("mla-9", "dsv3", g.pages[0], "NB,BS,D", kind="mla", tp_rank=2, tp_size=2)
    assert engine.read_count("dsv3", g.tokens) == [0, 0]
    assert engine.stats()["stored_chunks"] == 2


def test_layout_mismatch_for_one_model_is_refused():
    engine = _engine()
    MLAGroup(engine, tp=1)
    other = [torch.zeros(8, 64, 512, dtype=torch.bfloat16) for _ in range(LAYERS)]
    with pytest.raises(ValueError, match="layout of model 'dsv3' differs"):
        engine.register("mla-x", "dsv3", other, "NB,BS,D", kind="mla")
