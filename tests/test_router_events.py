"""Router-grade KV events (``--vllm-events``, :mod:`gpukv.ops.router_events`), in process: gpukv's
objects and vLLM engines' descriptions of their chunks become vLLM ``KVEventBatch`` messages on a
ZMQ PUB socket; the consumer here decodes them with vLLM's own structs and rebuilds, per medium,
exactly the blocks gpukv holds -- through stores, evictions, tier loads, clears and a second
engine storing the same prefix (no duplicate) -- and an MHA chunk only once every TP rank's
object is there. Each engine's own share of the events (``take_events``) is exactly the blocks
it described first."""

from __future__ import annotations

import hashlib

import pytest
import torch

from vllm_runs import require_vllm

require_vllm()

from gpukv import CacheEngine, EngineConfig  # noqa: E402
from gpukv.frontend import protocol as p  # noqa: E402
from gpukv.ops import vllm_wire as w  # noqa: E402
from router_cases import Rebuilt, Subscriber  # noqa: E402

CS, BS = 16, 8
CHUNK_BYTES = 4096  # one rank's object: 2 layers x K,V x 16 tokens x 2 heads x 8 x fp32


def _engine(tmp_path, *, capacity_chunks: int = 64, disk: bool = True, **kw) -> CacheEngine:
    cfg = dict(capacity_bytes=capacity_chunks * CHUNK_BYTES, device="cpu", chunk_size=CS,
               vllm_events_address=f"ipc://{tmp_path}/vllm-events.sock")
    cfg.update(kw)
    if disk:
        cfg["disk_dir"] = str(tmp_path / "disk")
    return CacheEngine(EngineConfig(**cfg))


def _register(engine: CacheEngine, tp: int = 2, model: str = "m") -> list[str]:
    names = []
    for rank in range(tp):
        name = f"{model}-r{rank}"
        engine.register(name, model, [torch.randn(32, 2, BS, 2, 8) for _ in range(2)], "NB,2,BS,H,D",
                        kind="mha", tp_rank=rank, tp_size=tp)
        names.append(name)
    return names


def _vllm_hashes(tokens: list[int]) -> list[bytes]:
    """A stand-in for vLLM's chained block hashes (32 bytes each, like sha256's)."""
    out, parent = [], b"none"
    for i in range(0, len(tokens) - len(tokens) % BS, BS):
        parent = hashlib.sha256(parent + repr(tokens[i:i + BS]).encode()).digest()
        out.append(parent)
    return out


class Prompt:
    def __init__(self, engine: CacheEngine, seed: int, chunks: int) -> None:
        self.tokens = torch.randint(1, 30000, (chunks * CS,), generator=torch.Generator().manual_seed(seed)).tolist()
        self.names = engine.copies.hashes(self.tokens)  # gpukv chunk hashes
        self.blocks = _vllm_hashes(self.tokens)
        bpc = CS // BS
        self.units = [tuple(self.blocks[i * bpc:(i + 1) * bpc]) for i in range(chunks)]

    def describe(self, models=("m",), tp=2, take=False, lora=None) -> p.VllmBlocks:
        bpc = CS // BS
        chunks = [p.ChunkBlocks(h, list(self.units[i]), self.blocks[i * bpc - 1] if i else None,
                                self.tokens[i * CS:(i + 1) * CS]) for i, h in enumerate(self.names)]
        return p.VllmBlocks(list(models), tp, BS, chunks, take_events=take,
                            lora_id=None if lora is None else 7, lora_name=lora)


def _store(engine: CacheEngine, names: list[str], prompt: Prompt, upto: int | None = None) -> None:
    n = len(prompt.tokens) if upto is None else upto * CS
    for name in names:
        engine.store(name, prompt.tokens[:n], torch.arange(n))


def _held(engine: CacheEngine, prompts: list[Prompt], tp: int = 2, model: str = "m") -> dict[str, set]:
    """What gpukv's books hold, as the consumer should see it: a chunk's block per tier where
    every rank's object is (read from the L1 and the disk tier's own index)."""
    core = engine.core
    spaces = core.registry.spaces(model, tp)
    disk = core.tiers[0] if core.tiers else None
    out: dict[str, set] = {}
    for prompt in prompts:
        for name, unit in zip(prompt.names, prompt.units):
            keys = [s.keys([name])[0] for s in spaces]
            if all(k in core.l1 for k in keys):
                out.setdefault("gpukv:L1", set()).add(unit)
            if disk is not None and all(disk.contains_many([s.tier_key(k)])[0] for s, k in zip(spaces, keys)):
                out.setdefault("gpukv:disk", set()).add(unit)
    return out


def _sync(engine: CacheEngine, sub: Subscriber) -> Rebuilt:
    assert engine.core.router.flush(10)
    return sub.drain()


@pytest.fixture
def setup(tmp_path):
    engine = _engine(tmp_path, capacity_chunks=16)
    sub = Subscriber(f"ipc://{tmp_path}/vllm-events.sock")
    assert engine.core.router.wait_for_subscribers(1, 10)
    yield engine, sub
    sub.close()
    engine.close()


def test_stores_spills_evictions_loads_clears_and_a_second_engine_rebuild_exactly(setup):
    engine, sub = setup
    names = _register(engine)
    a, b = Prompt(engine, 1, 3), Prompt(engine, 2, 8)
    engine.core.router.describe("engine-1", a.describe())
    _store(engine, names[:1], a)  # rank 0 only: no chunk is loadable by a TP=2 engine yet
    rebuilt = _sync(engine, sub)
    assert rebuilt.blocks() == {} and rebuilt.cleared == 1  # the stream starts with a clear
    _store(engine, names[1:], a)
    assert engine.core.flush(10)
    rebuilt = _sync(engine, sub)
    assert rebuilt.blocks() == {"gpukv:L1": set(a.units), "gpukv:disk": set(a.units)} == _held(engine, [a])
    first = rebuilt.stored[0]
    assert first.block_hashes == list(a.units[0]) and first.parent_block_hash is None
    assert first.token_ids == a.tokens[:CS] and first.block_size == BS and first.group_idx == 0
    assert rebuilt.stored[1].parent_block_hash == a.units[0][-1]

    # a second engine describes and stores the same prompt while gpukv holds it: no event at all
    count, batches = sum(rebuilt.events.values()), rebuilt.next_seq
    engine.core.router.describe("engine-2", a.describe())
    _store(engine, names, a)
    assert engine.core.flush(10)
    rebuilt = _sync(engine, sub)
    assert sum(rebuilt.events.values()) == count and rebuilt.next_seq == batches

    # b stored before it is described: announced when the description arrives; its 16 objects
    # evict all of a's from an L1 of 16 (a stays on disk)
    _store(engine, names, b)
    assert engine.core.flush(10)
    assert _sync(engine, sub).blocks().get("gpukv:L1", set()) & set(b.units) == set()
    engine.core.router.describe("engine-1", b.describe())
    rebuilt = _sync(engine, sub)
    assert rebuilt.blocks() == _held(engine, [a, b])
    assert rebuilt.events["BlockRemoved"] == 3 and rebuilt.blocks()["gpukv:L1"] == set(b.units)

    # a tier load: a's chunks come back into L1 for a request, and leave with it
    assert engine.lookup("m", a.tokens, request_id="req", tp_size=2) == 3 * CS
    rebuilt = _sync(engine, sub)
    assert set(a.units) <= rebuilt.blocks()["gpukv:L1"] and rebuilt.blocks() == _held(engine, [a, b])
    engine.end_session("req")  # the temporary copies are released
    assert _sync(engine, sub).blocks() == _held(engine, [a, b])

    # an operator's clear: what L1 dropped is withdrawn, what a request holds stays
    assert engine.lookup("m", b.tokens[:CS], request_id="keeps-one", tp_size=2) == CS
    engine.core.l1.clear()
    rebuilt = _sync(engine, sub)
    assert rebuilt.blocks() == _held(engine, [a, b])
    assert rebuilt.blocks()["gpukv:L1"] == {b.units[0]}
    assert rebuilt.duplicates == 0 and rebuilt.unknown_removals == 0 and not rebuilt.gaps


def test_each_engine_takes_only_the_blocks_it_described_first(tmp_path):
    now = [0.0]
    engine = _engine(tmp_path, disk=False)
    engine.core.router.outboxes.clock = lambda: now[0]
    names = _register(engine, tp=1)
    a = Prompt(engine, 3, 2)
    router = engine.core.router
    assert router.describe("engine-1", a.describe(tp=1, take=True)) == ([], False)
    assert router.describe("engine-2", a.describe(tp=1, take=True)) == ([], False)
    _store(engine, names, a)
    assert router.flush(10)
    mine, _ = router.describe("engine-1", p.VllmBlocks(["m"], 1, BS, take_events=True))
    theirs, _ = router.describe("engine-2", p.VllmBlocks(["m"], 1, BS, take_events=True))
    assert [w.decode_event(e).block_hashes for e in mine] == [list(u) for u in a.units]
    assert theirs == []
    # engine-1 stops taking: after stale_s its blocks go to the next engine that describes them,
    # which gets them as they stand
    now[0] += router.outboxes.stale_s + 1
    router.describe("engine-2", a.describe(tp=1, take=True))
    assert router.flush(10)
    taken, more = router.describe("engine-2", p.VllmBlocks(["m"], 1, BS, take_events=True))
    assert [(type(e).__name__, e.medium) for e in map(w.decode_event, taken)] == \
        [("BlockStored", "gpukv:L1")] * 2 and not more
    engine.close()


def test_pipeline_stages_announce_a_chunk_once_every_stage_holds_it(tmp_path):
    engine = _engine(tmp_path, disk=False)
    stage0, stage1 = _register(engine, tp=1, model="m-pp0"), _register(engine, tp=1, model="m-pp1")
    a = Prompt(engine, 4, 1)
    sub = Subscriber(f"ipc://{tmp_path}/vllm-events.sock")
    assert engine.core.router.wait_for_subscribers(1, 10)
    engine.core.router.describe("e", a.describe(models=("m-pp0", "m-pp1"), tp=1))
    _store(engine, stage0, a)
    assert _sync(engine, sub).blocks() == {}
    _store(engine, stage1, a)
    assert _sync(engine, sub).blocks() == {"gpukv:L1": set(a.units)}
    sub.close()
    engine.close()


@pytest.mark.parametrize("edit, why", [
    (lambda c: c.__class__(c.chunk_hash, c.block_hashes, c.parent, c.token_ids[:-1]), "15 token ids"),
    (lambda c: c.__class__(c.chunk_hash, c.block_hashes[:1], c.parent, c.token_ids), "1 block hashes"),
    (lambda c: c.__class__(c.chunk_hash, c.block_hashes, -1, c.token_ids), "block hash -1"),
    (lambda c: c.__class__(c.chunk_hash, c.block_hashes, c.parent, c.token_ids, [None]), "1 extra keys"),
])
def test_a_description_that_does_not_fit_is_refused_whole(tmp_path, edit, why):
    engine = _engine(tmp_path, disk=False)
    _register(engine, tp=1)
    a = Prompt(engine, 5, 2)
    body = a.describe(tp=1)
    bad = p.VllmBlocks(body.models, 1, BS, [body.chunks[0], edit(body.chunks[1])])
    with pytest.raises(ValueError, match=why):
        engine.core.router.describe("e", bad)
    assert engine.core.router.flush(10) and len(engine.core.router.table) == 0  # the good one too
    engine.close()


def test_bounds_refuse_new_descriptions_once_every_unit_is_announced(tmp_path):
    engine = _engine(tmp_path, disk=False, vllm_events_units=2)
    names = _register(engine, tp=1)
    a, b = Prompt(engine, 6, 2), Prompt(engine, 7, 1)
    router = engine.core.router
    router.describe("e", b.describe(tp=1))  # idle (not stored): dropped first when room is needed
    router.describe("e", a.describe(tp=1))
    _store(engine, names, a)
    assert router.flush(10)
    assert router.stats()["dropped"] == 1 and len(router.table) == 2
    router.describe("e", b.describe(tp=1))  # both units are announced: no room
    assert router.flush(10) and engine.core.stats()["vllm_events"]["refused"] == 1
    engine.close()


def test_descriptions_past_the_waiting_bound_are_busy_and_change_nothing(tmp_path):
    from gpukv.errors import Busy

    engine = _engine(tmp_path, disk=False)
    _register(engine, tp=1)
    router = engine.core.router
    a = Prompt(engine, 9, 3)
    router.max_pending_chunks = 2
    with router._cond:  # noqa: SLF001 - the thread cannot take the first description yet
        router.describe("e", p.VllmBlocks(["m"], 1, BS, a.describe(tp=1).chunks[:2]))
        with pytest.raises(Busy, match="at most 2"):
            router.describe("e", p.VllmBlocks(["m"], 1, BS, a.describe(tp=1).chunks[2:]))
    assert router.flush(10) and len(router.table) == 2
    router.describe("e", p.VllmBlocks(["m"], 1, BS, a.describe(tp=1).chunks[2:]))  # room again
    assert router.flush(10) and len(router.table) == 3
    engine.close()


def test_inputs_past_the_bound_restart_the_stream_with_a_clear(tmp_path):
    engine = _engine(tmp_path, disk=False)
    names = _register(engine, tp=1)
    router = engine.core.router
    sub = Subscriber(f"ipc://{tmp_path}/vllm-events.sock")
    assert router.wait_for_subscribers(1, 10)
    a = Prompt(engine, 8, 2)
    router.describe("e", a.describe(tp=1, take=True))
    _store(engine, names, a)
    assert _sync(engine, sub).blocks() == {"gpukv:L1": set(a.units)}
    router.max_pending = 0  # the next input finds the queue "full"
    router.describe("e", a.describe(tp=1))
    rebuilt = _sync(engine, sub)
    assert rebuilt.cleared == 2 and rebuilt.blocks() == {} and router.resets == 1
    taken, _ = router.describe("e", p.VllmBlocks(["m"], 1, BS, take_events=True))
    assert type(w.decode_event(taken[-1])).__name__ == "AllBlocksCleared"
    sub.close()
    engine.close()


def test_the_socket_is_protected_like_gpukvs_own_events(tmp_path):
    with pytest.raises(ValueError, match="abstract"):
        _engine(tmp_path, vllm_events_address="ipc://@gpukv-vllm-events")
    with pytest.raises(ValueError):
        _engine(tmp_path, vllm_events_address="tcp://0.0.0.0:5557")
    engine = _engine(tmp_path, disk=False)
    path = engine.core.router.address[len("ipc://"):]
    import os
    import stat

    assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0  # this user's socket alone
    engine.close()
    assert not os.path.exists(path)
