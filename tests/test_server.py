"""The server end to end: a ``gpukv serve`` process, worker processes whose KV caches are their
own plain tensors (all layers views of one ``torch.zeros`` buffer, as vLLM allocates them).

The server owns the arenas (sealed memfds; two of them stand for two devices) and keeps the
books; each worker maps them and packs/unpacks its own pages. Narrated TP=2 scenarios (MLA: rank 0
stores, the scheduler looks up with tp_size=2, both ranks retrieve; MHA: every rank its own
shard), four TP=2 engines on one server, ranks on two devices reading one MLA object, disk hits
after a server restart. The scheduler (this process) and the workers share one group secret, as
the processes of one engine do.
"""

from __future__ import annotations

import time

import pytest
import torch

from frontend_cases import (CHUNK, DIMS, RANK_BLOCKS, STORE_BLOCKS, Worker, chunk_bytes, client,
                            kv_cache, mismatched_tokens, prompt, rows, secret, serving, slots_of)
from gpukv.frontend.client import ServerUnavailable
from gpukv.frontend.process import ServerProcess

N = 5 * CHUNK  # full chunks of a prompt() of 87 tokens
DEVICES = "cpu:0,cpu:1"


def start_server(address: str, disk_dir) -> ServerProcess:
    return ServerProcess(address, capacity_bytes=16 << 20, devices=DEVICES, chunk_size=CHUNK,
                         disk_dir=disk_dir)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("srv")
    address, group = f"ipc://{tmp}/gpukv.sock", secret("engine")
    workers = [Worker() for _ in range(2)]  # they start while the server starts
    state = dict(address=address, tmp=tmp, workers=workers, server=None, sched=None,
                 restart=lambda: start_server(address, tmp / "disk"))
    try:
        state["server"] = start_server(address, tmp / "disk")
        for w in workers:
            w("connect", address, group=group)
        state["sched"] = client(address, group=group)
        yield state
    finally:
        if state["sched"] is not None:
            state["sched"].close()
        for w in workers:
            w.close()
        if state["server"] is not None:  # the restarted one, after the restart test
            state["server"].stop()


def test_ping_reports_the_server(env):
    info = env["sched"].ping()
    assert info["chunk_size"] == env["sched"].chunk_size == CHUNK
    assert info["pid"] == env["server"].pid and info["devices"] == DEVICES.split(",")
    assert info["version"] == 2


def test_mla_tp2_one_store_every_rank_retrieves(env):
    w0, w1 = env["workers"]
    sched, model, tokens = env["sched"], "ds-mla", prompt(1)
    for rank, w in enumerate((w0, w1)):
        w("alloc", "mla", "mla", seed=10 + rank)
        w("register", "mla", "mla", model, "mla", rank, 2)
    store_slots = slots_of(STORE_BLOCKS, len(tokens))
    source = w0("rows", "mla", "mla", store_slots[:N])
    # rank 0 stores; rank 1's store of the same MLA chunks is a no-op (one object per TP group)
    assert w0("call", "store", "mla", tokens, store_slots) == N
    assert w1("call", "store", "mla", tokens, store_slots) == 0
    # the scheduler looks up for the whole TP group: 2 shares per object
    assert sched.lookup(model, tokens, request_id="mla-req", tp_size=2) == N
    assert sched.read_count(model, tokens) == [2] * 5
    for rank, w in enumerate((w0, w1)):
        slots = slots_of(RANK_BLOCKS[rank], N)
        assert w("call", "retrieve", "mla", tokens[:N], slots, request_id="mla-req") == N
        assert mismatched_tokens(w("rows", "mla", "mla", slots), source) == 0
        # the object survives the first rank's retrieve, with one share left for rank 1
        counts = sched.read_counts(model, tokens)
        assert counts["read_counts"] == [1 - rank] * 5 and counts["present"] == [True] * 5
    assert sched.free_lookup_locks("mla-req") == 0
    sched.end_session("mla-req")
    assert sched.read_counts(model, tokens)["evictable"] == [True] * 5
    # every rank looks up for itself (its own request, one reader): its retrieve releases it
    for rank, w in enumerate((w0, w1)):
        assert w("call", "lookup", model, tokens, request_id=f"self{rank}", tp_size=2,
                 num_readers=1) == N
    assert sched.read_count(model, tokens) == [2] * 5
    assert w1("call", "retrieve", "mla", tokens[:N], slots_of(RANK_BLOCKS[1], N),
              request_id="self1") == N
    assert sched.read_count(model, tokens) == [1] * 5
    assert w0("call", "free_lookup_locks", "self0") == 5  # rank 0 aborts: frees its own share
    assert sched.read_count(model, tokens) == [0] * 5


def test_mha_tp2_every_rank_its_own_shard(env):
    w0, w1 = env["workers"]
    sched, model, tokens = env["sched"], "llama-mha", prompt(2)
    store_slots = slots_of(STORE_BLOCKS, len(tokens))
    sources = []
    for rank, w in enumerate((w0, w1)):
        w("alloc", "mha", "mha", seed=20 + rank)
        w("register", "mha", "mha", model, "mha", rank, 2)
        sources.append(w("rows", "mha", "mha", store_slots[:N]))
    assert w0("call", "store", "mha", tokens, store_slots) == N
    # rank 1 has not stored yet: a TP=2 lookup needs both shards, so it misses
    assert sched.lookup(model, tokens, request_id="mha-miss", tp_size=2) == 0
    assert w1("call", "store", "mha", tokens, store_slots) == N
    assert sched.lookup(model, tokens, request_id="mha-req", tp_size=2) == N
    for rank in range(2):  # MHA: one share on each rank's own object (extra_count 0)
        assert sched.read_count(model, tokens, kv_rank=rank) == [1] * 5
    for rank, w in enumerate((w0, w1)):
        slots = slots_of(RANK_BLOCKS[rank], N)
        assert w("call", "retrieve", "mha", tokens[:N], slots, request_id="mha-req") == N
        assert mismatched_tokens(w("rows", "mha", "mha", slots), sources[rank]) == 0
        assert sched.read_count(model, tokens, kv_rank=rank) == [0] * 5
    assert sched.free_lookup_locks("mha-req") == 0
    sched.end_session("mha-req")


def test_four_tp2_engines_on_one_server_take_two_shares_not_eight(env):
    w0, w1 = env["workers"]
    sched, model, tokens = env["sched"], "ds-4x", prompt(3)
    for rank, w in enumerate((w0, w1)):  # engine e's rank r lives in worker process r
        w("alloc", "4x", "mla", seed=30 + rank)
        for e in range(4):
            w("register", f"engine{e}-rank{rank}", "4x", model, "mla", rank, 2)
    assert sched.stats()["models"][model]["instances"] == 8
    source = w0("rows", "4x", "mla", slots_of(STORE_BLOCKS, N))
    assert w0("call", "store", "engine0-rank0", tokens, slots_of(STORE_BLOCKS, len(tokens))) == N
    assert sched.lookup(model, tokens, request_id="4x-req", tp_size=2) == N
    assert sched.read_count(model, tokens) == [2] * 5
    for rank, w in enumerate((w0, w1)):  # engine 2 retrieves: its two ranks release both shares
        assert w("call", "retrieve", f"engine2-rank{rank}", tokens[:N],
                 slots_of(RANK_BLOCKS[rank], N), request_id="4x-req") == N
        got = w("rows", "4x", "mla", slots_of(RANK_BLOCKS[rank], N))
        assert mismatched_tokens(got, source) == 0
    assert sched.read_count(model, tokens) == [0] * 5
    # num_readers overrides tp_size (e.g. only 3 ranks read): 3 shares, freed by the scheduler
    assert sched.lookup(model, tokens, request_id="4x-dcp", tp_size=8, num_readers=3) == N
    assert sched.read_count(model, tokens) == [3] * 5
    assert sched.free_lookup_locks("4x-dcp") == 15
    for rank, w in enumerate((w0, w1)):
        for e in range(4):
            w("call", "unregister", f"engine{e}-rank{rank}")
    assert sched.stats()["models"][model]["instances"] == 0


def test_ranks_on_two_devices_read_one_mla_object(env):
    w0, w1 = env["workers"]
    sched, model, tokens = env["sched"], "ds-2dev", prompt(4)
    before = sched.stats()["l1"]["devices"]
    for rank, w in enumerate((w0, w1)):
        w("alloc", "2dev", "mla", seed=40 + rank)
        w("register", "2dev", "2dev", model, "mla", rank, 2, device=f"cpu:{rank}")
    source = w0("rows", "2dev", "mla", slots_of(STORE_BLOCKS, N))
    assert w0("call", "store", "2dev", tokens, slots_of(STORE_BLOCKS, len(tokens))) == N
    assert w1("call", "store", "2dev", tokens, slots_of(STORE_BLOCKS, len(tokens))) == 0
    after = sched.stats()["l1"]["devices"]
    # stored once (never duplicated), spread over the group's two arenas by chunk hash: the
    # capacity of an MLA group is the sum of its arenas
    hashes = sched.copies.hashes(tokens)
    spread = [sum(int.from_bytes(h[:8], "little") % 2 == d for h in hashes) for d in (0, 1)]
    assert [a["objects"] - b["objects"] for a, b in zip(after, before)] == spread
    assert min(spread) > 0
    assert sched.lookup(model, tokens, request_id="2dev", tp_size=2) == N
    for rank, w in enumerate((w0, w1)):  # each rank reads objects on both devices
        slots = slots_of(RANK_BLOCKS[rank], N)
        assert w("call", "retrieve", "2dev", tokens[:N], slots, request_id="2dev") == N
        assert mismatched_tokens(w("rows", "2dev", "mla", slots), source) == 0
    assert sched.read_count(model, tokens) == [0] * 5


def test_a_parked_copy_stalls_neither_ping_nor_other_workers(env):
    w0, w1 = env["workers"]
    sched, model, tokens, other = env["sched"], "ds-park", prompt(5), prompt(6)
    for rank, w in enumerate((w0, w1)):
        w("alloc", "park", "mla", seed=50 + rank)
        w("register", "park", "park", model, "mla", rank, 2)
    w0("arm", "pack", "before")
    w0.start("call", "store", "park", tokens, slots_of(STORE_BLOCKS, len(tokens)))
    assert w0.wait_hook() == "pack"
    try:  # rank 0 holds its write plan, its pack not run: everything else goes on
        assert sched.ping()["chunk_size"] == CHUNK
        assert sched.lookup(model, tokens, request_id="park", tp_size=2) == 0  # not readable yet
        assert w1("call", "store", "park", other, slots_of(STORE_BLOCKS, len(other))) == N
        assert sched.lookup(model, other, request_id="park-other", tp_size=1) == N
        assert w1("call", "retrieve", "park", other[:N], slots_of(RANK_BLOCKS[1], N),
                  request_id="park-other") == N
    finally:
        w0.go()
    assert w0.result() == N
    assert sched.lookup(model, tokens, request_id="park2", tp_size=1) == N
    assert sched.free_lookup_locks("park2") == 5


def test_disk_hits_after_a_server_restart(env):
    w0, w1 = env["workers"]
    sched, tokens = env["sched"], {"mla": prompt(7), "mha": prompt(8)}
    models = {"mla": "ds-restart", "mha": "llama-restart"}
    store_slots = slots_of(STORE_BLOCKS, len(tokens["mla"]))
    sources = {}
    for kind in ("mla", "mha"):
        for rank, w in enumerate((w0, w1)):
            w("alloc", f"r-{kind}", kind, seed=60 + rank)
            w("register", f"r-{kind}", f"r-{kind}", models[kind], kind, rank, 2)
            sources[kind, rank] = w("rows", f"r-{kind}", kind, store_slots[:N])
        for w in ((w0,) if kind == "mla" else (w0, w1)):
            assert w("call", "store", f"r-{kind}", tokens[kind], store_slots) == N
    assert sched.flush(30)
    env["server"].stop()
    # a dead server is an exception naming its address, not a hang
    t0 = time.monotonic()
    with pytest.raises(ServerUnavailable, match=env["address"]):
        sched.ping(timeout_s=0.5)
    assert time.monotonic() - t0 < 5
    maps_before = [w("mapped_arenas") for w in (w0, w1)]
    env["server"] = env["restart"]()
    for kind in ("mla", "mha"):  # the new server knows no instance: every worker registers again
        for rank, w in enumerate((w0, w1)):
            w("register", f"r-{kind}", f"r-{kind}", models[kind], kind, rank, 2)
        before = sched.stats()["hit_chunks_tier"].get("disk", 0)
        assert sched.lookup(models[kind], tokens[kind], request_id=f"r-{kind}", tp_size=2) == N
        assert sched.stats()["hit_chunks_tier"]["disk"] - before == 5  # every chunk from disk
        for rank, w in enumerate((w0, w1)):
            slots = slots_of(RANK_BLOCKS[rank], N)
            assert w("call", "retrieve", f"r-{kind}", tokens[kind][:N], slots,
                     request_id=f"r-{kind}") == N
            src = sources[kind, 0 if kind == "mla" else rank]
            assert mismatched_tokens(w("rows", f"r-{kind}", kind, slots), src) == 0
        for rank in range(1 if kind == "mla" else 2):
            assert sched.read_count(models[kind], tokens[kind], kv_rank=rank) == [0] * 5
        assert sched.free_lookup_locks(f"r-{kind}") == 0
    # the dead server's arenas are unmapped: each worker maps the new server's device 0 alone
    assert min(maps_before) >= 1 and [w("mapped_arenas") for w in (w0, w1)] == [1, 1]
    # the workers copy into the NEW server's arena: a client that maps it afresh reads what
    # rank 0 stores now
    fresh = prompt(9)
    assert w0("call", "store", "r-mla", fresh, store_slots) == N
    reader_pages = kv_cache("mla", 99)
    sched.register("reader", models["mla"], reader_pages, DIMS["mla"], kind="mla", tp_rank=1,
                   tp_size=2)
    assert sched.lookup(models["mla"], fresh, request_id="fresh") == N
    dst = slots_of(RANK_BLOCKS[1], N)
    assert sched.retrieve("reader", fresh[:N], dst, request_id="fresh") == N
    assert mismatched_tokens(rows(reader_pages, "mla", dst), sources["mla", 0]) == 0
    sched.unregister("reader")


def test_demo_through_a_server(capsys):
    from gpukv.demo import run_demo

    assert run_demo(kinds=["mla"], tp_size=2, num_tokens=4 * CHUNK, num_layers=2,
                    chunk_size=CHUNK, device="cpu", server=True) == 0
    out = capsys.readouterr().out
    assert "after restart" in out and "NO" not in out


# ---- in-process server ------------------------------------------------------------------------
def test_capacity_and_eviction_are_per_device(tmp_path):
    from gpukv.frontend.sessions import Limits

    slots = 6
    nbytes = slots * chunk_bytes("mla")
    with serving(tmp_path, capacity_bytes=nbytes, devices=("cpu:0", "cpu:1"),
                 limits=Limits(max_reserved_bytes=nbytes)) as server, \
            client(server.address) as c0, client(server.address) as c1:
        p0, p1 = kv_cache("mla", 1), kv_cache("mla", 2)
        # two models: a shared MLA model spreads over all its instances' devices
        c0.register("d0", "m", p0, DIMS["mla"], kind="mla", device="cpu:0")
        c1.register("d1", "m1", p1, DIMS["mla"], kind="mla", device="cpu:1")
        kept = prompt(1)
        assert c0.store("d0", kept, slots_of(STORE_BLOCKS, len(kept))) == N
        for seed in range(2, 6):  # device 1 churns through many prompts: it evicts its own
            other = prompt(seed, 3 * CHUNK)
            assert c1.store("d1", other, slots_of(STORE_BLOCKS, len(other))) == 3 * CHUNK
        devices = c0.stats()["l1"]["devices"]
        assert devices[0]["objects"] == 5 and devices[0]["evictions"] == 0
        assert devices[1]["objects"] == slots and devices[1]["evictions"] == 4 * 3 - slots
        assert devices[0]["capacity_bytes"] == devices[1]["capacity_bytes"] == slots * chunk_bytes("mla")
        # device 0 kept every chunk of its prompt, bit-exact
        assert c0.lookup("m", kept, request_id="kept") == N
        dst = slots_of(RANK_BLOCKS[0], N)
        assert c0.retrieve("d0", kept[:N], dst, request_id="kept") == N
        assert mismatched_tokens(rows(p0, "mla", dst), rows(p0, "mla", slots_of(STORE_BLOCKS, N))) == 0


def test_sglang_kv_pools_register_as_a_pair(tmp_path):
    with serving(tmp_path) as server, client(server.address) as c:
        buf = torch.zeros(2, 2, 24 * 16, 2, 32, dtype=torch.float16)  # [k|v, layer, slot, H, D]
        buf.view(torch.int16).random_(-(1 << 15), 1 << 15)
        k_layers, v_layers = list(buf[0]), list(buf[1])
        c.register("sg", "sglang", (k_layers, v_layers), "S,H,D", kind="mha")
        tokens = prompt(7)
        assert c.store("sg", tokens, torch.arange(len(tokens))) == N
        assert c.lookup("sglang", tokens, request_id="q") == N
        dst = torch.arange(N) + 200
        assert c.retrieve("sg", tokens[:N], dst, request_id="q") == N
        for t in k_layers + v_layers:
            assert torch.equal(t[dst].view(torch.int16), t[:N].view(torch.int16))
        with pytest.raises(ValueError, match="equal in length, got 2 and 1"):
            c.register("sg2", "sglang", (k_layers, v_layers[:1]), "S,H,D", kind="mha")
