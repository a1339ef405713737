"""The embedded engine under a real scheduler: aborts, unregisters and expiries in the middle of a
copy, repeated lookups, a full request table, failing tiers.

Interleavings are forced with hooks between phases: the copy function the engine calls is wrapped
so that the interfering call runs while the copy holds its plan (before the bytes move), then the
real copy runs. Bytes are checked bit-exact, shares exactly.
"""

from __future__ import annotations

import pytest
import torch

import gpukv.engine.copy_job as engine_mod
from gpukv import CacheEngine, EngineConfig
from gpukv.demo import make_pages, token_rows
from gpukv.errors import Busy
from gpukv.l1 import Status

CS = 64
LAYERS = 2
CHUNK_BYTES = LAYERS * CS * 1152  # MLA: 576 bf16 per token and layer


def _slots(blocks, num_tokens, block_size=64):
    offs = torch.arange(num_tokens)
    return torch.as_tensor(list(blocks))[offs // block_size] * block_size + offs % block_size


def _engine(num_chunks: int, **kw) -> CacheEngine:
    return CacheEngine(EngineConfig(capacity_bytes=num_chunks * CHUNK_BYTES, device="cpu",
                                    chunk_size=CS, **kw))


def _mla(engine, name, tp_rank=0, tp_size=2, seed=0):
    torch.manual_seed(seed)
    pages = make_pages("mla", LAYERS, 16, tp_size, "cpu")
    engine.register(name, "dsv3", pages, "NB,BS,D", kind="mla", tp_rank=tp_rank, tp_size=tp_size)
    return pages


def _rows(pages, slots):
    return [token_rows(layer, "mla", slots).view(torch.int16).clone() for layer in pages]


@pytest.fixture
def hook(monkeypatch):
    """``hook("unpack", fn)``: ``fn()`` runs inside the engine's next unpack, before the bytes
    move (once); returns a list that records the call."""
    def install(name: str, fn):
        real = getattr(engine_mod, name)
        calls = []

        def wrapped(*args, **kwargs):
            if not calls:
                calls.append(fn())
            return real(*args, **kwargs)
        monkeypatch.setattr(engine_mod, name, wrapped)
        return calls
    return install


def test_free_and_store_pressure_during_a_retrieve_never_hand_it_another_prompts_bytes(hook):
    engine = _engine(4)
    src = _mla(engine, "r0", seed=1)
    dst = _mla(engine, "r1", tp_rank=1, seed=2)
    tokens = list(range(2 * CS))
    engine.store("r0", tokens, _slots([0, 1], 2 * CS))
    expected = _rows(src, _slots([0, 1], 2 * CS))
    assert engine.lookup("dsv3", tokens, request_id="A", tp_size=2) == 2 * CS
    other = [list(range(10_000 + i * 2 * CS, 10_000 + (i + 1) * 2 * CS)) for i in range(2)]

    def abort_and_flood():  # the scheduler aborts A, then new prompts need every slot
        freed = engine.free_lookup_locks("A")
        stored = [engine.store("r0", t, _slots([4 + 2 * i, 5 + 2 * i], 2 * CS))
                  for i, t in enumerate(other)]
        return freed, stored

    calls = hook("unpack", abort_and_flood)
    read_slots = _slots([9, 8], 2 * CS)
    assert engine.retrieve("r1", tokens, read_slots, request_id="A") == 2 * CS
    freed, stored = calls[0]
    assert freed == 4  # 2 objects x 2 shares
    # the second prompt evicted the first one's chunks, never A's pinned (unlocked) ones
    assert stored == [2 * CS, 2 * CS] and engine.l1.stats()["evictions"] == 2
    assert all(torch.equal(a, b) for a, b in zip(_rows(dst, read_slots), expected))
    assert engine.read_count("dsv3", tokens) == [0, 0]
    assert engine.l1.stats()["pinned"] == 0
    assert engine.lookup("dsv3", tokens, request_id="B") == 2 * CS  # A's prefix is still cached
    assert engine.lookup("dsv3", other[0], request_id="C") == 0


def test_unregister_during_a_store_stores_nothing_and_an_innocent_client_keeps_its_bytes(hook):
    engine = _engine(2)
    victim = _mla(engine, "victim", seed=3)
    innocent = _mla(engine, "innocent", tp_rank=1, seed=4)
    tokens_v, tokens_i = list(range(2 * CS)), list(range(5000, 5000 + 2 * CS))

    def unregister_and_store_other():
        engine.unregister("victim")  # a reap or an UNREGISTER while the pack runs
        return engine.store("innocent", tokens_i, _slots([2, 3], 2 * CS))

    calls = hook("pack", unregister_and_store_other)
    assert engine.store("victim", tokens_v, _slots([0, 1], 2 * CS)) == 0  # nothing committed
    assert calls == [0]  # the victim's slots were still being written: no room for the innocent
    assert engine.l1.used_bytes == 0  # and they were freed when the pack let go
    assert engine.store("innocent", tokens_i, _slots([2, 3], 2 * CS)) == 2 * CS
    assert engine.lookup("dsv3", tokens_i, request_id="I", tp_size=1) == 2 * CS
    out = _slots([10, 11], 2 * CS)
    assert engine.retrieve("innocent", tokens_i, out, request_id="I") == 2 * CS
    assert all(torch.equal(a, b) for a, b in
               zip(_rows(innocent, out), _rows(innocent, _slots([2, 3], 2 * CS))))
    assert engine.lookup("dsv3", tokens_v, request_id="V") == 0
    del victim


def test_an_expired_write_lease_during_a_store_stores_nothing(hook):
    engine = _engine(2, write_lease_s=5.0)
    _mla(engine, "r0", tp_size=1)
    now = [0.0]
    engine.l1._clock = lambda: now[0]

    def time_passes_and_expire():
        now[0] = 100.0
        return engine.core.expire()

    hook("pack", time_passes_and_expire)
    assert engine.store("r0", list(range(2 * CS)), _slots([0, 1], 2 * CS)) == 0
    assert engine.l1.stats()["expired_writes"] == 2 and engine.l1.used_bytes == 0
    assert engine.lookup("dsv3", list(range(2 * CS)), request_id="R") == 0


def test_repeated_lookups_top_up_and_range_free_releases_exactly_its_chunks():
    engine = _engine(8)
    _mla(engine, "r0", tp_size=8)
    tokens = list(range(4 * CS))
    engine.store("r0", tokens, _slots(range(4), 4 * CS))
    for _ in range(16):  # vLLM may call its lookup hook many times per request
        assert engine.lookup("dsv3", tokens, request_id="R", tp_size=8) == 4 * CS
    assert engine.read_count("dsv3", tokens) == [8, 8, 8, 8]
    # the engine already had the first 2 chunks (and a bit): free [0, 2 chunks + 10 tokens)
    assert engine.free_lookup_locks("R", start_token=0, end_token=2 * CS + 10) == 16
    assert engine.read_count("dsv3", tokens) == [0, 0, 8, 8]
    assert engine.free_lookup_locks("R", start_token=CS + 1) == 16  # chunks 2 and 3 (not 1)
    assert engine.read_count("dsv3", tokens) == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="end_token"):
        engine.free_lookup_locks("R", start_token=10, end_token=5)


def test_a_full_request_table_refuses_new_requests_without_dropping_others():
    engine = _engine(4, max_requests=2)
    pages = _mla(engine, "r0", tp_size=1)
    tokens = list(range(CS))
    engine.store("r0", tokens, _slots([0], CS))
    assert engine.lookup("dsv3", tokens, request_id="a") == CS
    assert engine.lookup("dsv3", tokens, request_id="b") == CS
    with pytest.raises(Busy, match="busy: 2 requests are open"):
        engine.lookup("dsv3", tokens, request_id="flood")
    assert engine.retrieve("r0", tokens, _slots([5], CS), request_id="a") == CS  # a still works
    engine.end_session("a")
    assert engine.lookup("dsv3", tokens, request_id="c") == CS
    del pages


def test_chunks_with_a_padding_slot_are_not_stored():
    engine = _engine(4)
    _mla(engine, "r0", tp_size=1)
    tokens = list(range(3 * CS))
    slots = _slots([0, 1, 2], 3 * CS)
    slots[CS + 5] = -1  # chunk 1 has a padded token
    assert engine.store("r0", tokens, slots) == 2 * CS  # chunks 0 and 2
    assert engine.lookup("dsv3", tokens, request_id="R") == CS  # the prefix stops at chunk 1


def test_bad_arguments_name_the_argument_and_change_nothing():
    engine = _engine(2)
    pages = make_pages("mla", LAYERS, 4, 1, "cpu")
    with pytest.raises(ValueError, match="tp_size"):
        engine.register("x", "dsv3", pages, "NB,BS,D", kind="mla", tp_size=True)
    with pytest.raises(ValueError, match="tp_rank"):
        engine.register("x", "dsv3", pages, "NB,BS,D", kind="mla", tp_rank=True, tp_size=2)
    engine.register("x", "dsv3", dict(enumerate(pages)), "NB,BS,D", kind="mla")  # a dict works
    with pytest.raises(TypeError, match="request_id must be hashable"):
        engine.lookup("dsv3", list(range(CS)), request_id=["not", "hashable"])
    with pytest.raises(ValueError, match="token_ids"):
        engine.store("x", [2**64 - 1] * CS, _slots([0], CS))
    assert engine.stats()["open_requests"] == 0 and engine.l1.used_bytes == 0


class _FailingTier:
    """A tier whose every call raises: the spill thread must log, count and go on."""

    name = "broken"
    local = True

    def __init__(self) -> None:
        self.calls = 0

    def contains_many(self, keys):
        self.calls += 1
        raise OSError(5, "Input/output error")

    def submit(self, key, fingerprint, payload):
        raise OSError(5, "Input/output error")

    def load_many(self, keys, fingerprint, nbytes, **kwargs):
        raise OSError(5, "Input/output error")

    def flush(self, timeout_s=None):
        return True

    def stats(self):
        return {}

    def close(self, timeout_s=None):
        return True


def test_a_tier_that_raises_never_kills_the_spill_or_fails_a_lookup():
    from gpukv.engine.spill import Spiller

    engine = _engine(4)
    _mla(engine, "r0", tp_size=1)
    tier = _FailingTier()
    engine.core.stack.tiers.append(tier)
    engine.core.stack.spiller = Spiller(engine.l1, engine.core.stack.tiers)
    for i in range(3):
        tokens = list(range(i * 1000, i * 1000 + CS))
        assert engine.store("r0", tokens, _slots([i], CS)) == CS
        assert engine.flush(10)
    # each batch: contains_many raised (logged, treated as "not held"), then submit raised
    assert tier.calls == 3 and engine.core.stack.spiller.counts == dict(spilled=0, dropped=0, errors=3)
    assert engine.l1.stats()["pinned"] == 0  # every spill pin released
    engine.clear_l1()
    assert engine.lookup("dsv3", list(range(CS)), request_id="R") == 0  # a miss, not an error
    assert engine.stats()["open_requests"] == 1 and engine.read_count("dsv3", list(range(CS))) == [0]
    engine.close()


def test_retrieve_skips_chunks_whose_slots_are_all_padding():
    engine = _engine(4)
    src = _mla(engine, "r0", tp_size=1)
    tokens = list(range(2 * CS))
    engine.store("r0", tokens, _slots([0, 1], 2 * CS))
    assert engine.lookup("dsv3", tokens, request_id="R") == 2 * CS
    assert engine.free_lookup_locks("R", end_token=CS) == 1  # the engine has chunk 0 itself
    assert engine.l1.delete([engine.object_keys("dsv3", tokens)[0][0]]) == [Status.OK]
    slots = _slots([7, 6], 2 * CS)
    slots[:CS] = -1  # chunk 0: not needed; chunk 1 goes to block 6
    assert engine.retrieve("r0", tokens, slots, request_id="R") == 2 * CS
    assert all(torch.equal(a, b) for a, b in
               zip(_rows(src, slots[CS:]), _rows(src, _slots([1], CS))))
    assert engine.read_count("dsv3", tokens) == [0, 0]
    assert engine.retrieve("r0", tokens, torch.full((2 * CS,), -1), request_id="R") == 2 * CS
