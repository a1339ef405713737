"""The embedded engine's metrics and KV events, driven by a scripted workload.

Counts are exact: hits per tier, stored / retrieved chunks, evictions per device, lease
expiries, retrieve failures; the events replay to exactly what L1 and the disk tier hold, through
eviction, a clear, temporary tier loads, an expired lease and a restart on the same disk folder.
"""

from __future__ import annotations

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from gpukv import CacheEngine, EngineConfig
from gpukv.demo import make_pages
from gpukv.ops.replay import replay

CS = 64
LAYERS = 2
CHUNK_BYTES = LAYERS * CS * 1152


def _engine(tmp_path, num_chunks=4, **kw):
    return CacheEngine(EngineConfig(capacity_bytes=num_chunks * CHUNK_BYTES, device="cpu",
                                    chunk_size=CS, disk_dir=str(tmp_path / "disk"), **kw))


def _slots(blocks, n):
    offs = torch.arange(n)
    return torch.as_tensor(list(blocks))[offs // 64] * 64 + offs % 64


def _register(engine, pages):
    engine.register("r0", "dsv3", pages, "NB,BS,D", kind="mla", tp_size=1)


def samples(engine) -> dict:
    """``{(name, labels...): value}`` of the engine's metrics text."""
    out = {}
    for family in text_string_to_metric_families(engine.core.observer.metrics.render().decode()):
        for s in family.samples:
            out[(s.name, *sorted(s.labels.items()))] = s.value
    return out


def test_metrics_count_what_the_workload_did(tmp_path):
    engine = _engine(tmp_path)
    _register(engine, make_pages("mla", LAYERS, 16, 1, "cpu"))
    prompt = list(range(3 * CS))
    assert engine.store("r0", prompt, _slots([0, 1, 2], 3 * CS)) == 3 * CS
    assert engine.flush(10)
    assert engine.lookup("dsv3", prompt + [7] * 20, request_id="a") == 3 * CS  # 3 L1
    assert engine.retrieve("r0", prompt, _slots([8, 9, 10], 3 * CS), request_id="a") == 3 * CS
    engine.end_session("a")
    assert engine.clear_l1() == 3
    assert engine.lookup("dsv3", prompt, request_id="b") == 3 * CS  # 3 from disk
    engine.end_session("b")
    other = [list(range(1000 * (i + 1), 1000 * (i + 1) + CS)) for i in range(4)]
    for i, tokens in enumerate(other):  # 4 new chunks into 4 slots
        engine.store("r0", tokens, _slots([3 + i], CS))
    with pytest.raises(ValueError, match="unknown request"):
        engine.retrieve("r0", prompt, _slots([8, 9, 10], 3 * CS), request_id="a")
    m = samples(engine)
    assert m[("gpukv_lookup_requests_total", ("model", "dsv3"))] == 2
    assert m[("gpukv_lookup_requested_tokens_total", ("model", "dsv3"))] == 6 * CS
    hits = {t: m[("gpukv_lookup_hit_tokens_total", ("model", "dsv3"), ("tier", t))]
            for t in ("L1", "disk", "remote")}
    assert hits == {"L1": 3 * CS, "disk": 3 * CS, "remote": 0}
    assert m[("gpukv_store_chunks_total", ("model", "dsv3"))] == 7
    assert m[("gpukv_retrieve_chunks_total", ("model", "dsv3"))] == 3
    assert m[("gpukv_lookup_seconds_count",)] == 2
    assert m[("gpukv_retrieve_failures_total", ("reason", "unknown_request"))] == 1
    # the temporary disk loads were released at end_session: no eviction was needed for them
    assert m[("gpukv_evictions_total", ("device", "cpu"))] == engine.l1.stats()["evictions"]
    assert m[("gpukv_l1_objects", ("device", "cpu"))] == 4
    assert m[("gpukv_l1_capacity_bytes", ("device", "cpu"))] == 4 * CHUNK_BYTES
    assert m[("gpukv_open_requests",)] == 0
    assert m[("gpukv_tier_up", ("tier", "disk"))] == 1
    engine.close()


def test_lease_expiries_and_deferred_frees_are_counted(tmp_path):
    engine = _engine(tmp_path, read_lease_s=5.0)
    _register(engine, make_pages("mla", LAYERS, 16, 1, "cpu"))
    now = [0.0]
    engine.l1._clock = lambda: now[0]
    prompt = list(range(2 * CS))
    engine.store("r0", prompt, _slots([0, 1], 2 * CS))
    assert engine.lookup("dsv3", prompt, request_id="a", tp_size=1) == 2 * CS
    _, pins = engine.l1.pin([k for k, _ in engine.object_keys("dsv3", prompt)])
    engine.l1.delete([pins[0].key], force=True)  # discarded while a copy pins it
    engine.l1.unpin(pins)
    now[0] = 10.0
    assert engine.l1.expire() == 1  # chunk 1's share (chunk 0's went with the delete)
    m = samples(engine)
    assert m[("gpukv_lease_expiries_total", ("kind", "read"))] == 1
    assert m[("gpukv_pin_deferred_frees_total",)] == 1
    engine.close()


def _contents(engine, tier_keys) -> dict:
    """What L1 and the disk tier hold, as ``{tier: {(model, kv_rank, hash)}}`` (the disk's
    files are named by a digest of the tier key: ``tier_keys`` are the candidates)."""
    from gpukv.engine.keys import parse_tier_key

    l1 = set()
    for key, entry in list(engine.l1._objects.items()):
        if entry.ready:
            space = engine.core.registry.space_of_key(key)
            l1.add((space.model, space.kv_rank, key[:16]))
    disk = engine.tiers[0]
    by_file = {disk._file_name(t): parse_tier_key(t) for t in tier_keys}
    on_disk = {(m, rank, h) for name in disk._index for m, _, rank, h in [by_file[name]]}
    return {"L1": l1, "disk": on_disk}


def test_kv_events_replay_to_exactly_what_each_tier_holds_across_a_restart(tmp_path):
    engine = _engine(tmp_path, events_buffer=10_000)
    pages = make_pages("mla", LAYERS, 16, 1, "cpu")
    _register(engine, pages)
    prompts = [list(range(i * 1000, i * 1000 + 2 * CS)) for i in range(4)]
    tier_keys = [t for prompt in prompts for _, t in engine.object_keys("dsv3", prompt)]
    events = []
    for i, prompt in enumerate(prompts[:3]):  # 6 chunks into 4 slots: 2 evicted
        assert engine.store("r0", prompt, _slots([2 * i, 2 * i + 1], 2 * CS)) == 2 * CS
        assert engine.flush(10)  # a chunk being spilled is pinned: not evictable until then
    engine.lookup("dsv3", prompts[0], request_id="a")  # evicted in L1: loaded from disk
    engine.end_session("a")  # the temporary copies are released
    engine.clear_l1()
    engine.store("r0", prompts[3], _slots([6, 7], 2 * CS))
    assert engine.flush(10)
    events += engine.core.observer.events.take_events()
    state = replay(events)
    assert state.complete and state.unknown_removals == 0
    want = _contents(engine, tier_keys)
    assert {t: state.tiers[t] for t in ("L1", "disk")} == want
    assert len(want["disk"]) == 8 and len(want["L1"]) == 2
    reasons = {(type(e).__name__, e.tier, e.reason) for e in events}
    assert {("KvRemoved", "L1", "evicted"), ("KvStored", "L1", "loaded"),
            ("KvRemoved", "L1", "released"), ("KvRemoved", "L1", "cleared"),
            ("KvStored", "disk", "new")} <= reasons
    engine.close()
    engine2 = _engine(tmp_path, events_buffer=10_000)  # a restart on the same folder
    _register(engine2, pages)
    events += engine2.core.observer.events.take_events()
    state = replay(events)
    assert state.tiers["L1"] == set() and state.tiers["disk"] == want["disk"]
    assert {e.reason for e in events if e.epoch == engine2.core.observer.events.epoch} == {"restart"}
    engine2.close()
