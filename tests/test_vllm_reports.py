"""The scheduler side's reports, each on its own: the per-request hit sources
(:mod:`gpukv.integrations.vllm.tier_hits`), the engine's share of the vLLM events
(:mod:`gpukv.integrations.vllm.events`) and the block describer
(:mod:`gpukv.integrations.vllm.block_meta`) on a fake client that records what it is sent."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from gpukv.engine.hit_sources import LookupHit
from gpukv.engine.keys import chunk_hashes, request_seed
from gpukv.integrations.vllm.tier_hits import TierLookups
from gpukv.ops import vllm_wire as w
from vllm_runs import require_vllm

require_vllm()

from vllm.distributed.kv_events import BlockRemoved, BlockStored  # noqa: E402
from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash  # noqa: E402

from gpukv.integrations.vllm.block_meta import BlockDescriber  # noqa: E402
from gpukv.integrations.vllm.events import EngineEvents  # noqa: E402

CS = 32


class _Lookups:
    """A client whose lookups answer the queued hits."""

    def __init__(self, *hits: LookupHit) -> None:
        self.hits = list(hits)
        self.freed = []

    def lookup_tiers(self, model, tokens, *, request_id, **options):
        return self.hits.pop(0)

    def free_lookup_locks(self, request_id, **kw):
        self.freed.append(request_id)


def test_a_repeated_lookup_keeps_where_the_first_one_found_each_chunk():
    client = _Lookups(LookupHit(3, (("cpu", 1), ("disk", 2))), LookupHit(4, (("cpu", 4),)))
    lookups = TierLookups(client, CS)
    assert lookups.lookup("m", [0] * 128, request_id="r") == 3 * CS
    assert lookups.lookup("m", [0] * 128, request_id="r") == 4 * CS  # the disk chunks sit in L1 now
    assert lookups.split(["r"], 0, 4 * CS) == {"cpu": 2 * CS, "disk": 2 * CS}
    # vLLM's own hit covers 48 tokens (3 blocks of 16): the external ones start inside chunk 1
    assert lookups.split(["r"], 48, 4 * CS - 48) == {"disk": CS - 16 + CS, "cpu": CS}
    lookups.free_lookup_locks("r")  # other calls go to the client
    assert client.freed == ["r"]
    lookups.forget(["r"])
    assert lookups.split(["r"], 0, CS) is None


def test_pipeline_stages_count_each_chunk_for_its_farthest_source_and_unknown_is_none():
    client = _Lookups(LookupHit(2, (("gpu", 2),)), LookupHit(2, (("gpu", 1), ("remote", 1))),
                      LookupHit(2, None))
    lookups = TierLookups(client, CS)
    lookups.lookup("m0", [], request_id="r@pp0")
    lookups.lookup("m1", [], request_id="r@pp1")
    assert lookups.split(["r@pp0", "r@pp1"], 0, 2 * CS) == {"gpu": CS, "remote": CS}
    assert lookups.split(["r@pp0"], 0, 3 * CS) is None  # past what the lookups covered
    lookups.lookup("m", [], request_id="old-server")
    assert lookups.split(["old-server"], 0, CS) is None


def _stored(hashes, medium="gpukv:L1") -> bytes:
    return w.encode(w.BlockStored(hashes, None, [1] * 4, 2, None, medium, None, group_idx=0))


def test_engine_events_withdraw_what_a_gone_server_announced_and_never_pass_a_clear_on():
    events = EngineEvents(max_events=8)
    events.add(1, [_stored([1, 2]), _stored([3, 4]), _stored([3, 4], "gpukv:disk"),
                   w.encode(w.BlockRemoved([3, 4], "gpukv:L1", group_idx=0))])
    got = events.take()
    assert [type(e) for e in got] == [BlockStored, BlockStored, BlockStored, BlockRemoved]
    assert events.take() == []
    events.add(2, [])  # another server process: what the first announced is gone
    withdrawn = events.take()
    assert sorted((e.medium, tuple(e.block_hashes)) for e in withdrawn) == \
        [("gpukv:L1", (1, 2)), ("gpukv:disk", (3, 4))]
    assert all(isinstance(e, BlockRemoved) and e.group_idx == 0 for e in withdrawn)
    events.add(2, [_stored([5, 6]), w.encode(w.AllBlocksCleared())])  # the server lost its inputs
    assert [(type(e), e.block_hashes) for e in events.take()] == [(BlockStored, [5, 6]), (BlockRemoved, [5, 6])]
    events.add(2, [_stored([i, i]) for i in range(10)])  # nobody took them: the oldest go
    assert len(events.take()) == 8 and events.dropped == 2


class _Recorder:
    """A guarded client that records VLLM_BLOCKS bodies and answers like a server of ``epoch``."""

    def __init__(self) -> None:
        self.server_info = {"salt": "tenant", "chunk_size": CS}
        self.bodies = []
        self.epoch, self.events = 1, []
        self.sent = threading.Event()

    def vllm_blocks(self, body):
        self.bodies.append(body)
        self.sent.set()
        events, self.events = self.events, []
        return {"epoch": self.epoch, "events": events, "more": False}


def _request(rid: str, tokens: list[int], block_size: int = 16) -> SimpleNamespace:
    hashes = [bytes([i % 256]) * 32 for i in range(len(tokens) // block_size)]
    return SimpleNamespace(request_id=rid, all_token_ids=tokens, block_hashes=hashes, cache_salt=None,
                           lora_request=None, mm_features=[], prompt_embeds=None,
                           skip_reading_prefix_cache=False)


def _wait(client: _Recorder, count: int) -> None:
    for _ in range(200):
        if len(client.bodies) >= count:
            return
        client.sent.wait(0.05)
        client.sent.clear()
    raise AssertionError(f"{len(client.bodies)} VLLM_BLOCKS sent, waited for {count}")


def test_chunks_are_named_on_gpukvs_chain_step_by_step_and_described_once():
    client = _Recorder()
    describer = BlockDescriber(client, models=["m"], tp_size=2, block_size=16, chunk_size=CS)
    tokens = list(range(1, 5 * CS + 1))
    request = _request("r", tokens)
    describer.track(request)
    describer.computed("r", 2 * CS + 5)  # two full chunks
    _wait(client, 1)
    describer.computed("r", 4 * CS)  # two more, named after the first two
    _wait(client, 2)
    names = [c.chunk_hash for body in client.bodies for c in body.chunks]
    assert names == chunk_hashes(tokens[:4 * CS], CS, seed=request_seed("tenant", b""))
    second = client.bodies[1].chunks[0]
    assert second.block_hashes == [maybe_convert_block_hash(h) for h in request.block_hashes[4:6]]
    assert second.parent == maybe_convert_block_hash(request.block_hashes[3])
    assert second.token_ids == tokens[2 * CS:3 * CS] and client.bodies[1].tp_size == 2
    # another request with the same prefix: its chunks were described to this server already
    describer.track(_request("s", tokens))
    describer.computed("s", 4 * CS)
    describer.computed("r", 5 * CS)
    _wait(client, 3)
    assert [len(b.chunks) for b in client.bodies] == [2, 2, 1]
    describer.close()


def test_a_request_that_does_not_fit_the_queue_is_not_described_further():
    client = _Recorder()
    describer = BlockDescriber(client, models=["m"], tp_size=1, block_size=16, chunk_size=CS, max_queued=3)
    with describer._cond:  # noqa: SLF001 - the thread holds off while the queue fills
        describer.track(_request("a", list(range(1, 4 * CS + 1))))
        describer.computed("a", 4 * CS)  # 4 chunks > 3: dropped whole
        describer.track(_request("b", list(range(7, 3 * CS + 7))))
        describer.computed("b", 3 * CS)
    describer.computed("a", 4 * CS)  # stays dropped: its later chunks need the earlier ones' names
    _wait(client, 1)
    assert describer.num_dropped == 1
    assert [len(b.chunks) for b in client.bodies] == [3]
    describer.close()


def _until(predicate, timeout_s: float = 10.0):
    """Poll ``predicate`` (the describer's thread works on its own) until it is truthy."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError("timed out")


def test_take_events_polls_and_a_new_server_process_forgets_what_was_described():
    client = _Recorder()
    describer = BlockDescriber(client, models=["m"], tp_size=1, block_size=16, chunk_size=CS,
                               take_events=True, poll_s=0.05)
    client.events = [_stored([1, 2])]
    got = _until(describer.take_events)  # polled with no chunk to describe
    assert [e.block_hashes for e in got] == [[1, 2]] and client.bodies[0].chunks == []
    tokens = list(range(1, CS + 1))
    describer.track(_request("r", tokens))
    describer.computed("r", CS)
    _until(lambda: sum(len(b.chunks) for b in client.bodies) == 1)
    describer.forget("r")
    client.epoch = 2  # the server restarted: what it was told, and what it announced, is gone
    withdrawn = _until(describer.take_events)
    assert [(type(e), e.block_hashes) for e in withdrawn] == [(BlockRemoved, [1, 2])]
    describer.track(_request("r2", tokens))
    describer.computed("r2", CS)  # the same chunk: described to the new server process
    _until(lambda: sum(len(b.chunks) for b in client.bodies) == 2)
    describer.close()
