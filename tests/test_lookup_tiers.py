"""Where a lookup's hit came from (``lookup_tiers``, LOOKUP with ``tiers``): one source per chunk
as runs, split exactly the way the chunks were found (L1 arena kind, disk, remote); the LOOKUP
change is additive both ways (old clients get an int, new clients of a server that cannot say
get ``sources=None``, and a LOOKUP without ``tiers`` still decodes on a server that predates it).
"""

from __future__ import annotations

import msgspec
import pytest
import torch

from frontend_cases import client, serving
from gpukv import CacheEngine, EngineConfig
from gpukv.engine.hit_sources import LookupHit, hit_runs, parse_runs, to_runs
from gpukv.frontend import protocol as p

CS = 16


def _engine(tmp_path, **kw) -> CacheEngine:
    return CacheEngine(EngineConfig(capacity_bytes=4 << 20, device="cpu", chunk_size=CS,
                                    disk_dir=str(tmp_path / "disk"), **kw))


def _register(cache, name="w", model="m") -> None:
    cache.register(name, model, [torch.randn(16, CS, 32) for _ in range(2)], "NB,BS,D", kind="mla")


def test_l1_then_disk_chunks_are_named_in_prompt_order(tmp_path):
    engine = _engine(tmp_path)
    _register(engine)
    tokens = list(range(1000, 1000 + 4 * CS))
    assert engine.store("w", tokens, torch.arange(4 * CS)) == 4 * CS
    assert engine.core.flush(10)
    assert engine.core.l1.clear() == 4  # L1 empty, the disk holds all four
    assert engine.store("w", tokens[:2 * CS], torch.arange(2 * CS)) == 2 * CS  # back in L1
    hit = engine.lookup_tiers("m", tokens, request_id="r")
    assert hit == LookupHit(4, (("cpu", 2), ("disk", 2)))
    assert hit.per_chunk() == ["cpu", "cpu", "disk", "disk"]
    # a repeated lookup finds the loaded chunks in L1 now (temporary copies, held by the request)
    assert engine.lookup_tiers("m", tokens, request_id="r") == LookupHit(4, (("cpu", 4),))
    assert engine.lookup("m", tokens, request_id="r") == 4 * CS  # the int API is unchanged
    engine.close()


def test_a_miss_and_a_partial_hit(tmp_path):
    engine = _engine(tmp_path)
    _register(engine)
    tokens = list(range(3 * CS))
    assert engine.lookup_tiers("m", tokens, request_id="a") == LookupHit(0, ())
    engine.store("w", tokens[:CS], torch.arange(CS))
    assert engine.lookup_tiers("m", tokens, request_id="b") == LookupHit(1, (("cpu", 1),))
    engine.close()


def test_runs_name_each_l1_chunk_by_the_farthest_arena_of_its_ranks():
    """Arena 0 on a GPU, arena 1 in host memory: a chunk with one rank's object on the host
    counts as ``cpu``; a chunk loaded from a tier counts for that tier."""
    where = {("a", 0): 0, ("a", 1): 0, ("a", 2): 0, ("b", 0): 0, ("b", 1): 1, ("b", 2): 0}
    keys = [[("a", c) for c in range(3)], [("b", c) for c in range(3)]]
    runs = hit_runs(where.__getitem__, ["gpu", "cpu"], keys, 2, ["L1"])
    assert runs == (("gpu", 1), ("cpu", 1), ("gpu", 1))
    assert hit_runs(where.__getitem__, ["gpu", "cpu"], keys, 1, ["remote", "disk"]) == \
        (("gpu", 1), ("remote", 1), ("disk", 1))
    assert hit_runs(where.__getitem__, ["gpu", "gpu"], keys, 3, []) == (("gpu", 3),)
    assert to_runs([]) == () and to_runs(["disk"] * 3) == (("disk", 3),)


@pytest.mark.parametrize("value, why", [
    ([["cpu", 2], ["tape", 1]], "bad sources run"), ([["cpu", 0]], "bad sources run"),
    ([["cpu", 2]], "cover 2 chunks, the hit has 3"), ("cpu", "must be a list"),
    ([["cpu", True], ["cpu", 2]], "bad sources run")])
def test_malformed_runs_are_refused_naming_them(value, why):
    with pytest.raises(ValueError, match=why):
        parse_runs(value, 3)


def test_through_the_server_lookup_tiers_and_the_old_int_reply(tmp_path):
    with serving(tmp_path, chunk_size=CS, disk_dir=str(tmp_path / "disk")) as server:
        c = client(server.config.address)
        assert "lookup_tiers" in c.server_info["features"]
        _register(c)
        tokens = list(range(500, 500 + 3 * CS))
        c.store("w", tokens, torch.arange(3 * CS))
        assert c.flush(10)
        server.core.l1.clear()
        c.store("w", tokens[:CS], torch.arange(CS))
        assert c.lookup_tiers("m", tokens, request_id="r") == LookupHit(3, (("cpu", 1), ("disk", 2)))
        assert c.lookup("m", tokens, request_id="r") == 3 * CS  # no tiers: the int reply
        c.server_info = {k: v for k, v in c.server_info.items() if k != "features"}  # an older server
        assert c.lookup_tiers("m", tokens, request_id="r") == LookupHit(3, None)
        c.close()


class _OldLookup(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="type",
                 tag="lookup"):
    """LOOKUP as a server before ``tiers`` decodes it."""

    model: str
    request_id: str | int
    hashes: list[bytes]
    tp_size: int = 1
    num_readers: int | None = None
    loadable: bool = False


def test_a_lookup_without_tiers_still_decodes_on_a_server_that_predates_them():
    new = msgspec.msgpack.encode(p.Lookup("m", "r", [b"x" * 16], tp_size=2, loadable=True))
    assert msgspec.msgpack.decode(new, type=_OldLookup) == _OldLookup("m", "r", [b"x" * 16], 2, None, True)
    with pytest.raises(msgspec.ValidationError, match="tiers"):  # only a client that asks sends it
        msgspec.msgpack.decode(msgspec.msgpack.encode(p.Lookup("m", "r", [], tiers=True)), type=_OldLookup)
