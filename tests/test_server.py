"""The server end to end: a ``gpukv serve`` process, worker processes with pages in shared memory.

Narrated TP=2 scenarios (MLA: rank 0 stores, the scheduler looks up with tp_size=2, both ranks
retrieve; MHA: every rank stores and retrieves its own shard), four TP=2 engines on one server,
disk hits after a server restart, the demo through a server, and (in-process) that a slow
transfer does not stall PING or LOOKUP. Shapes are tiny (chunk 16, 3 layers) to stay fast.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from gpukv.frontend.client import CacheClient, ServerUnavailable
from gpukv.frontend.server import ServerProcess

CHUNK = 16
BLOCK = 16
LAYERS = 3
NUM_BLOCKS = 24
DIMS = {"mla": "NB,BS,D", "mha": "NB,2,BS,H,D"}
SHAPES = {"mla": (NUM_BLOCKS, BLOCK, 64), "mha": (NUM_BLOCKS, 2, BLOCK, 2, 32)}


# ---- a worker process: pages in shared memory, a CacheClient, commands over a pipe -------------
class _WorkerState:
    def __init__(self, address: str) -> None:
        from gpukv.frontend.shm import ShmAllocator

        self.client = CacheClient(address, timeout_s=60, connect_timeout_s=120)
        self.shm = ShmAllocator()
        self.pages: dict[str, list[torch.Tensor]] = {}

    def alloc(self, name: str, kind: str, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        pages = [self.shm.empty(SHAPES[kind], torch.bfloat16) for _ in range(LAYERS)]
        for layer in pages:  # arbitrary bit patterns, NaNs included
            layer.view(torch.int16).copy_(torch.randint(-(1 << 15), 1 << 15, layer.shape,
                                                        generator=gen, dtype=torch.int16))
        self.pages[name] = pages

    def register(self, instance_id, name: str, model: str, kind: str, tp_rank: int,
                 tp_size: int) -> None:
        self.client.register(instance_id, model, self.pages[name], DIMS[kind], kind=kind,
                             tp_rank=tp_rank, tp_size=tp_size)

    def rows(self, name: str, kind: str, slots: torch.Tensor) -> list[torch.Tensor]:
        return [token_rows(layer, kind, slots).clone() for layer in self.pages[name]]

    def call(self, method: str, *args, **kwargs):
        return getattr(self.client, method)(*args, **kwargs)

    def info(self) -> dict:
        return dict(pid=os.getpid(), session=self.client.session, shm=self.shm.paths)

    def close(self) -> None:
        self.client.close()
        self.shm.close()


def _worker_main(conn, address: str) -> None:
    state = _WorkerState(address)
    while True:
        method, args, kwargs = conn.recv()
        if method == "exit":
            state.close()
            conn.send((True, None))
            return
        try:
            conn.send((True, getattr(state, method)(*args, **kwargs)))
        except Exception as exc:  # noqa: BLE001 - shipped back to the test and re-raised there
            conn.send((False, exc))


class Worker:
    """Handle on a spawned worker process; ``worker("method", ...)`` runs a command there."""

    def __init__(self, address: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, address), daemon=True)
        self.proc.start()

    def __call__(self, method: str, *args, **kwargs):
        self.conn.send((method, args, kwargs))
        if not self.conn.poll(120):
            raise TimeoutError(f"worker {self.proc.pid}: {method} took over 120 s")
        ok, value = self.conn.recv()
        if not ok:
            raise value
        return value

    def kill(self) -> None:
        """SIGKILL: no cleanup at all (no unregister, no unlink, pings just stop)."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(10)

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self("exit")
            except (OSError, EOFError, TimeoutError):
                pass
            self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)


def token_rows(layer: torch.Tensor, kind: str, slots: torch.Tensor) -> torch.Tensor:
    """Raw int16 KV rows of ``slots``: ``[tokens, D]`` (MLA) or ``[2, tokens, H, D]`` (MHA)."""
    bits = layer.view(torch.int16)
    if kind == "mla":
        return bits.reshape(-1, bits.shape[-1])[slots]
    nb, _, bs, h, d = bits.shape
    return bits.permute(1, 0, 2, 3, 4).reshape(2, nb * bs, h, d)[:, slots]


def slots_of(blocks: list[int], num_tokens: int) -> torch.Tensor:
    offs = torch.arange(num_tokens)
    return torch.tensor(blocks)[offs // BLOCK] * BLOCK + offs % BLOCK


def prompt(seed: int, num_tokens: int = 5 * CHUNK + 7) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50_000, (num_tokens,), generator=gen).tolist()


def start_server(address: str, disk_dir: Path, **options) -> ServerProcess:
    return ServerProcess(address, capacity_bytes=64 << 20, device="cpu", chunk_size=CHUNK,
                         disk_dir=disk_dir, **options)


# ---- fixtures: one server and two worker processes for the module ----------------------------
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("srv")
    address = f"ipc://{tmp}/gpukv.sock"
    workers = [Worker(address) for _ in range(2)]  # they connect once the server is up
    server = None
    try:
        server = start_server(address, tmp / "disk")
        scheduler = CacheClient(address, timeout_s=60)
        yield dict(address=address, tmp=tmp, server=server, workers=workers, sched=scheduler,
                   restart=lambda: start_server(address, tmp / "disk"))
        scheduler.close()
    finally:
        for w in workers:
            w.close()
        if server is not None:
            server.stop()


STORE_BLOCKS, RANK_BLOCKS = [3, 11, 7, 0, 20, 5], [[9, 2, 17, 14, 1, 22], [8, 12, 4, 19, 23, 6]]


def test_ping_reports_the_servers_chunk_size(env):
    info = env["sched"].ping()
    assert info["chunk_size"] == env["sched"].chunk_size == CHUNK
    assert info["device"] == "cpu" and info["pid"] == env["server"].pid


def test_mla_tp2_one_store_every_rank_retrieves(env):
    w0, w1 = env["workers"]
    sched, model, tokens = env["sched"], "ds-mla", prompt(1)
    n = len(tokens) // CHUNK * CHUNK  # 80 tokens: 5 full chunks
    for rank, w in enumerate((w0, w1)):
        w("alloc", "mla", "mla", seed=10 + rank)
        w("register", "mla", "mla", model, "mla", rank, 2)
    store_slots = slots_of(STORE_BLOCKS, len(tokens))
    source = w0("rows", "mla", "mla", store_slots[:n])
    # rank 0 stores; rank 1's store of the same MLA chunks is a no-op (one object per TP group)
    assert w0("call", "store", "mla", tokens, store_slots) == n
    assert w1("call", "store", "mla", tokens, store_slots) == 0
    # the scheduler looks up for the whole TP group: 2 shares per object
    assert sched.lookup(model, tokens, request_id="mla-req", tp_size=2) == n
    assert sched.read_count(model, tokens) == [2] * 5
    for rank, w in enumerate((w0, w1)):
        slots = slots_of(RANK_BLOCKS[rank], n)
        assert w("call", "retrieve", "mla", tokens[:n], slots, request_id="mla-req") == n
        got = w("rows", "mla", "mla", slots)
        assert all(torch.equal(g, s) for g, s in zip(got, source))
        # the object survives the first rank's retrieve, with one share left for rank 1
        counts = sched.read_counts(model, tokens)
        assert counts["read_counts"] == [1 - rank] * 5 and counts["present"] == [True] * 5
    assert sched.free_lookup_locks("mla-req") == 0
    sched.end_session("mla-req")
    assert sched.read_counts(model, tokens)["evictable"] == [True] * 5
    # legacy (tp_size=2, world_size=2): every rank looks up for itself, one share each, and
    # its retrieve releases its own
    for w in (w0, w1):
        assert w("call", "lookup", model, tokens, request_id="self", tp_size=2, num_readers=1) == n
    assert sched.read_count(model, tokens) == [2] * 5
    assert sched.free_lookup_locks("self") == 0  # the scheduler holds none of them
    assert w1("call", "retrieve", "mla", tokens[:n], slots_of(RANK_BLOCKS[1], n),
              request_id="self") == n
    assert sched.read_count(model, tokens) == [1] * 5
    assert w0("call", "free_lookup_locks", "self") == 5  # rank 0 aborts: frees its own share
    assert sched.read_count(model, tokens) == [0] * 5


def test_mha_tp2_every_rank_its_own_shard(env):
    w0, w1 = env["workers"]
    sched, model, tokens = env["sched"], "llama-mha", prompt(2)
    n = len(tokens) // CHUNK * CHUNK
    store_slots = slots_of(STORE_BLOCKS, len(tokens))
    sources = []
    for rank, w in enumerate((w0, w1)):
        w("alloc", "mha", "mha", seed=20 + rank)
        w("register", "mha", "mha", model, "mha", rank, 2)
        sources.append(w("rows", "mha", "mha", store_slots[:n]))
    assert w0("call", "store", "mha", tokens, store_slots) == n
    # rank 1 has not stored yet: a TP=2 lookup needs both shards, so it misses
    assert sched.lookup(model, tokens, request_id="mha-miss", tp_size=2) == 0
    assert w1("call", "store", "mha", tokens, store_slots) == n
    assert sched.lookup(model, tokens, request_id="mha-req", tp_size=2) == n
    for rank in range(2):  # MHA: one share on each rank's own object (extra_count 0)
        assert sched.read_count(model, tokens, kv_rank=rank) == [1] * 5
    for rank, w in enumerate((w0, w1)):
        slots = slots_of(RANK_BLOCKS[rank], n)
        assert w("call", "retrieve", "mha", tokens[:n], slots, request_id="mha-req") == n
        got = w("rows", "mha", "mha", slots)
        assert all(torch.equal(g, s) for g, s in zip(got, sources[rank]))
        assert sched.read_count(model, tokens, kv_rank=rank) == [0] * 5
    assert sched.free_lookup_locks("mha-req") == 0


def test_four_tp2_engines_on_one_server_take_two_shares_not_eight(env):
    w0, w1 = env["workers"]
    sched, model, tokens = env["sched"], "ds-4x", prompt(3)
    n = len(tokens) // CHUNK * CHUNK
    for rank, w in enumerate((w0, w1)):  # engine e's rank r lives in worker process r
        w("alloc", "4x", "mla", seed=30 + rank)
        for e in range(4):
            w("register", f"engine{e}-rank{rank}", "4x", model, "mla", rank, 2)
    assert sched.stats()["instances"] >= 8
    assert w0("call", "store", "engine0-rank0", tokens, slots_of(STORE_BLOCKS, len(tokens))) == n
    assert sched.lookup(model, tokens, request_id="4x-req", tp_size=2) == n
    assert sched.read_count(model, tokens) == [2] * 5
    for rank, w in enumerate((w0, w1)):  # engine 2 retrieves: its two ranks release both shares
        assert w("call", "retrieve", f"engine2-rank{rank}", tokens[:n],
                 slots_of(RANK_BLOCKS[rank], n), request_id="4x-req") == n
    assert sched.read_count(model, tokens) == [0] * 5
    # num_readers overrides tp_size (e.g. only 3 ranks read): 3 shares, freed by the scheduler
    assert sched.lookup(model, tokens, request_id="4x-dcp", tp_size=8, num_readers=3) == n
    assert sched.read_count(model, tokens) == [3] * 5
    assert sched.free_lookup_locks("4x-dcp") == 15
    for rank, w in enumerate((w0, w1)):
        for e in range(4):
            w("call", "unregister", f"engine{e}-rank{rank}")


def test_disk_hits_after_a_server_restart(env):
    w0, w1 = env["workers"]
    sched, tokens = env["sched"], {"mla": prompt(4), "mha": prompt(5)}
    n = len(tokens["mla"]) // CHUNK * CHUNK
    models = {"mla": "ds-restart", "mha": "llama-restart"}
    store_slots = slots_of(STORE_BLOCKS, len(tokens["mla"]))
    sources = {}
    for kind in ("mla", "mha"):
        for rank, w in enumerate((w0, w1)):
            w("alloc", f"r-{kind}", kind, seed=40 + rank)
            w("register", f"r-{kind}", f"r-{kind}", models[kind], kind, rank, 2)
            sources[kind, rank] = w("rows", f"r-{kind}", kind, store_slots[:n])
        for w in ((w0,) if kind == "mla" else (w0, w1)):
            assert w("call", "store", f"r-{kind}", tokens[kind], store_slots) == n
    assert sched.flush(30)
    env["server"].stop()
    # a dead server is an exception naming its address, not a hang
    t0 = time.monotonic()
    with pytest.raises(ServerUnavailable, match=env["address"]):
        sched.ping(timeout_s=0.5)
    assert time.monotonic() - t0 < 5
    env["server"] = env["restart"]()
    for kind in ("mla", "mha"):  # the new server knows no instance: every worker registers again
        for rank, w in enumerate((w0, w1)):
            w("register", f"r-{kind}", f"r-{kind}", models[kind], kind, rank, 2)
        before = sched.stats()["hit_chunks_tier"].get("disk", 0)
        assert sched.lookup(models[kind], tokens[kind], request_id=f"r-{kind}", tp_size=2) == n
        assert sched.stats()["hit_chunks_tier"]["disk"] - before == 5  # every chunk from disk
        for rank, w in enumerate((w0, w1)):
            slots = slots_of(RANK_BLOCKS[rank], n)
            assert w("call", "retrieve", f"r-{kind}", tokens[kind][:n], slots,
                     request_id=f"r-{kind}") == n
            got = w("rows", f"r-{kind}", kind, slots)
            src = sources[kind, 0 if kind == "mla" else rank]
            assert all(torch.equal(g, s) for g, s in zip(got, src))
        for rank in range(1 if kind == "mla" else 2):
            assert sched.read_count(models[kind], tokens[kind], kv_rank=rank) == [0] * 5
        assert sched.free_lookup_locks(f"r-{kind}") == 0


def test_demo_through_a_server(capsys):
    from gpukv.demo import run_demo

    assert run_demo(kinds=["mla"], tp_size=2, num_tokens=4 * CHUNK, num_layers=2,
                    chunk_size=CHUNK, device="cpu", server=True) == 0
    out = capsys.readouterr().out
    assert "after restart" in out and "NO" not in out


class _SlowStoreEngine:
    """A real engine whose STORE waits on a gate: a transfer that takes as long as we like."""

    def __init__(self, engine, gate: threading.Event) -> None:
        self._engine, self._gate, self.entered = engine, gate, threading.Event()

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def store(self, *args, **kwargs):
        self.entered.set()
        assert self._gate.wait(30)
        return self._engine.store(*args, **kwargs)


@contextlib.contextmanager
def serving(engine, address: str):
    """A CacheServer on ``engine`` in a thread of this process (for cheap in-process checks)."""
    from gpukv.frontend.server import CacheServer, ServerConfig

    server = CacheServer(engine, ServerConfig(address=address))
    loop = threading.Thread(target=server.serve_forever)
    loop.start()
    try:
        yield server
    finally:
        server.stop()
        loop.join(10)


def engine(capacity_bytes: int = 8 << 20):
    from gpukv.config import EngineConfig
    from gpukv.engine import CacheEngine

    return CacheEngine(EngineConfig(capacity_bytes=capacity_bytes, device="cpu", chunk_size=CHUNK))


def test_sglang_kv_pools_register_as_a_pair(tmp_path):
    from gpukv.frontend.shm import ShmAllocator

    with serving(engine(), f"ipc://{tmp_path}/s.sock") as server, ShmAllocator() as shm, \
            CacheClient(server.address, timeout_s=10) as client:
        k_layers = [shm.empty((NUM_BLOCKS * BLOCK, 2, 32), torch.float16) for _ in range(2)]
        v_layers = [shm.empty((NUM_BLOCKS * BLOCK, 2, 32), torch.float16) for _ in range(2)]
        for t in k_layers + v_layers:
            t.view(torch.int16).random_(-(1 << 15), 1 << 15)
        client.register("sg", "sglang", (k_layers, v_layers), "S,H,D", kind="mha")
        tokens = prompt(7)
        n = len(tokens) // CHUNK * CHUNK
        assert client.store("sg", tokens, torch.arange(len(tokens))) == n
        assert client.lookup("sglang", tokens, request_id="q") == n
        dst = torch.arange(n) + 200
        assert client.retrieve("sg", tokens[:n], dst, request_id="q") == n
        for t in k_layers + v_layers:
            assert torch.equal(t[dst].view(torch.int16), t[:n].view(torch.int16))
        with pytest.raises(ValueError, match="differ in length"):
            client.register("sg2", "sglang", (k_layers, v_layers[:1]), "S,H,D", kind="mha")


def test_a_long_store_stalls_neither_ping_nor_lookup(tmp_path):
    from gpukv.frontend.shm import ShmAllocator

    gate = threading.Event()
    slow = _SlowStoreEngine(engine(), gate)
    with serving(slow, f"ipc://{tmp_path}/s.sock") as server:
        try:
            with ShmAllocator() as shm, CacheClient(server.address, timeout_s=10) as worker, \
                    CacheClient(server.address, timeout_s=10) as other:
                pages = [shm.zeros(SHAPES["mla"], torch.bfloat16) for _ in range(LAYERS)]
                worker.register("w", "m", pages, DIMS["mla"], kind="mla")
                tokens = prompt(6)
                result = {}
                store = threading.Thread(target=lambda: result.update(
                    n=worker.store("w", tokens, slots_of(STORE_BLOCKS, len(tokens)))))
                store.start()
                assert slow.entered.wait(10)
                # the STORE is parked in a transfer thread: PING and LOOKUP still answer, from
                # another client and from another thread of the same client
                assert other.ping()["chunk_size"] == CHUNK
                assert other.lookup("m", tokens, request_id="q", tp_size=2) == 0
                assert worker.ping()["chunk_size"] == CHUNK
                assert store.is_alive()
                gate.set()
                store.join(10)
                assert result["n"] == 5 * CHUNK
                assert other.lookup("m", tokens, request_id="q2", tp_size=2) == 5 * CHUNK
        finally:
            gate.set()  # never leave a transfer thread parked
