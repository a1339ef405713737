"""Shared plumbing of the front-end tests: tiny KV caches, an in-process server, worker processes.

KV caches are what an engine allocates: plain ``torch.zeros`` tensors, all layers views of ONE
buffer (vLLM's cross-layer layout), filled with arbitrary bit patterns (NaNs included), so rows
are compared as raw int16. Shapes are tiny (chunk 16, 3 layers) to keep the tests fast.

Worker processes (``Worker``) are spawned children that hold their own pages and a
``CacheClient``; the test drives them over a ``multiprocessing`` Pipe (test plumbing only, not
gpukv's wire). ``Worker.arm(op, mode)`` wraps the next ``pack``/``unpack`` of that worker's client
so that it stops at a known point ("before" or "after" the real copy) and waits for the test:
the test then interferes (frees, stores, kills) and lets it go on. No sleeps synchronize anything.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
from pathlib import Path
from typing import Iterator

import torch

CHUNK = 16
BLOCK = 16
LAYERS = 3
NUM_BLOCKS = 24
DIMS = {"mla": "NB,BS,D", "mha": "NB,2,BS,H,D"}
LAYER_SHAPES = {"mla": (NUM_BLOCKS, BLOCK, 576), "mha": (NUM_BLOCKS, 2, BLOCK, 2, 32)}
ROW_BYTES = {"mla": 576 * 2, "mha": 2 * 32 * 2}
STORE_BLOCKS = [3, 11, 7, 0, 20, 5]
RANK_BLOCKS = [[9, 2, 17, 14, 1, 22], [8, 12, 4, 19, 23, 6]]
N = 5 * CHUNK  # the full chunks of a prompt() of 5 * CHUNK + 7 tokens


def chunk_bytes(kind: str) -> int:
    """Bytes of one chunk of the test layouts: layers x kv x chunk x row."""
    return LAYERS * (1 if kind == "mla" else 2) * CHUNK * ROW_BYTES[kind]


def kv_cache(kind: str, seed: int, *, layers: int = LAYERS, device: str = "cpu") -> list[torch.Tensor]:
    """``layers`` per-layer tensors, views of one ``torch.zeros`` buffer, random bits."""
    buf = torch.zeros((layers, *LAYER_SHAPES[kind]), dtype=torch.bfloat16, device=device)
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(-(1 << 15), 1 << 15, buf.shape, generator=gen, dtype=torch.int16)
    buf.view(torch.int16).copy_(bits.to(device))
    return [buf[layer] for layer in range(layers)]


def token_rows(layer: torch.Tensor, kind: str, slots: torch.Tensor) -> torch.Tensor:
    """Raw int16 KV rows of ``slots``: ``[tokens, D]`` (MLA) or ``[2, tokens, H, D]`` (MHA)."""
    bits = layer.view(torch.int16)
    slots = slots.to(bits.device)
    if kind == "mla":
        return bits.reshape(-1, bits.shape[-1])[slots].cpu()
    nb, _, bs, h, d = bits.shape
    return bits.permute(1, 0, 2, 3, 4).reshape(2, nb * bs, h, d)[:, slots].cpu()


def rows(layers: list[torch.Tensor], kind: str, slots: torch.Tensor) -> list[torch.Tensor]:
    return [token_rows(layer, kind, slots).clone() for layer in layers]


def mismatched_tokens(got: list[torch.Tensor], want: list[torch.Tensor]) -> int:
    """Tokens whose rows differ in any layer (0 = bit-exact); rows as from :func:`rows`."""
    bad = torch.zeros(0, dtype=torch.bool)
    for g, w in zip(got, want, strict=True):
        diff = (g != w).any(1) if g.dim() == 2 else (g != w).any(3).any(2).any(0)
        bad = diff if not bad.numel() else bad | diff
    return int(bad.sum())


def slots_of(blocks: list[int], num_tokens: int) -> torch.Tensor:
    offs = torch.arange(num_tokens)
    return torch.tensor(blocks)[offs // BLOCK] * BLOCK + offs % BLOCK


def prompt(seed: int, num_tokens: int = 5 * CHUNK + 7) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50_000, (num_tokens,), generator=gen).tolist()


def round_trip_is_exact(c, instance: str, model: str, kind: str, seed: int) -> bool:
    """Register fresh pages as ``instance``, store a prompt, look it up and retrieve it into other
    blocks: True when every stored token came back bit-exact."""
    pages, tokens = kv_cache(kind, seed), prompt(100 + seed)
    c.register(instance, model, pages, DIMS[kind], kind=kind)
    assert c.store(instance, tokens, slots_of(STORE_BLOCKS, len(tokens))) == N
    assert c.lookup(model, tokens, request_id="q") == N
    dst = slots_of(RANK_BLOCKS[0], N)
    assert c.retrieve(instance, tokens[:N], dst, request_id="q") == N
    return mismatched_tokens(rows(pages, kind, dst), rows(pages, kind, slots_of(STORE_BLOCKS, N))) == 0


def secret(tag: str) -> str:
    """A group secret for tests (16..128 characters)."""
    return f"{tag}-{os.urandom(8).hex()}"


def one_shot(monkeypatch, op: str, action) -> None:
    """The next ``op`` ("pack"/"unpack") of a client in this process runs ``action()`` first, then
    the real copy (later calls, e.g. other clients' inside ``action``, are plain)."""
    import gpukv.engine.copy_job as copy_job_module

    real = getattr(copy_job_module, op)

    def hooked(*args, **kwargs):
        monkeypatch.setattr(copy_job_module, op, real)
        action()
        real(*args, **kwargs)

    monkeypatch.setattr(copy_job_module, op, hooked)


# ---- an in-process server -----------------------------------------------------------------------
@contextlib.contextmanager
def serving(tmp_path: Path, *, worker_timeout_s: float = 30.0, limits=None, max_pending: int = 64,
            allow_abstract: bool = False, address: str | None = None, **engine) -> Iterator:
    """A ``CacheServer`` on a fresh ``CacheCore`` (shared arenas) whose loop runs in a thread of
    this process; ``engine`` overrides :class:`EngineConfig` fields (default 8 MiB on cpu)."""
    from gpukv.config import EngineConfig
    from gpukv.engine.core import CacheCore
    from gpukv.frontend.server import CacheServer, ServerConfig
    from gpukv.frontend.sessions import Limits

    engine = dict(dict(capacity_bytes=8 << 20, device="cpu", chunk_size=CHUNK), **engine)
    core = CacheCore(EngineConfig(**engine), shared=True)
    config = ServerConfig(address=address or f"ipc://{tmp_path}/gpukv.sock",
                          worker_timeout_s=worker_timeout_s, limits=limits or Limits(),
                          max_pending=max_pending, allow_abstract=allow_abstract)
    server = CacheServer(core, config)
    loop = threading.Thread(target=server.serve_forever, name="test-server-loop", daemon=True)
    loop.start()
    try:
        yield server
    finally:
        server.stop()
        loop.join(30)
        core.close(flush_timeout_s=10)
        for memory in core.memories:
            memory.close()


def client(address: str, **options):
    from gpukv.frontend.client import CacheClient

    return CacheClient(address, timeout_s=options.pop("timeout_s", 30), **options)


# ---- worker processes ---------------------------------------------------------------------------
class _WorkerState:
    def __init__(self, conn) -> None:
        self.conn = conn
        self.client = None
        self.pages: dict[str, list[torch.Tensor]] = {}

    def connect(self, address: str, **options) -> dict:
        self.client = client(address, **options)
        return dict(pid=os.getpid(), session=self.client.session)

    def lie_about_pid(self, pid: int) -> None:
        """Make this process report ``pid`` as its own (what a faulty or hostile client, or one
        in another pid namespace, tells the server)."""
        os.getpid = lambda: pid

    def alloc(self, name: str, kind: str, seed: int, device: str = "cpu") -> None:
        self.pages[name] = kv_cache(kind, seed, device=device)

    def register(self, instance_id, name: str, model: str, kind: str, tp_rank: int,
                 tp_size: int, device: str | None = None) -> None:
        self.client.register(instance_id, model, self.pages[name], DIMS[kind], kind=kind,
                             tp_rank=tp_rank, tp_size=tp_size, device=device)

    def rows(self, name: str, kind: str, slots: torch.Tensor) -> list[torch.Tensor]:
        return rows(self.pages[name], kind, slots)

    def mapped_arenas(self) -> int:
        """How many server arena mappings this process holds (memfd maps in /proc/self/maps)."""
        with open("/proc/self/maps") as f:
            return sum("memfd:gpukv-arena" in line for line in f)

    def call(self, method: str, *args, **kwargs):
        return getattr(self.client, method)(*args, **kwargs)

    def arm(self, op: str, mode: str) -> None:
        """The next ``op`` ("pack"/"unpack") of this client stops "before" or "after" its real
        copy, tells the test ("hook", op) and waits for "go"."""
        import gpukv.engine.copy_job as copy_job_module

        real = getattr(copy_job_module, op)

        def hooked(*args, **kwargs):
            setattr(copy_job_module, op, real)  # one shot
            if mode == "after":
                real(*args, **kwargs)
            self.conn.send(("hook", op))
            assert self.conn.recv() == "go"
            if mode == "before":
                real(*args, **kwargs)

        setattr(copy_job_module, op, hooked)


def _worker_main(conn) -> None:
    state = _WorkerState(conn)
    while True:
        method, args, kwargs = conn.recv()
        if method == "exit":
            if state.client is not None:
                state.client.close()
            conn.send(("ok", None))
            return
        try:
            conn.send(("ok", getattr(state, method)(*args, **kwargs)))
        except Exception as exc:  # noqa: BLE001 - shipped back to the test and re-raised there
            conn.send(("err", exc))


class Worker:
    """A spawned worker process; ``w("method", ...)`` runs a command there and returns its value.

    ``w.start(...)`` sends a command without waiting; ``w.wait_hook()`` waits until an armed copy
    stopped; ``w.go()`` lets it continue; ``w.result()`` returns the started command's value.
    """

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child,), daemon=True)
        self.proc.start()
        child.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def __call__(self, method: str, *args, **kwargs):
        self.start(method, *args, **kwargs)
        return self.result()

    def start(self, method: str, *args, **kwargs) -> None:
        self.conn.send((method, args, kwargs))

    def _expect(self, what: str, wanted: str):
        """The worker's next message, which must be tagged ``wanted`` (its error is re-raised)."""
        if not self.conn.poll(120):
            raise TimeoutError(f"worker {self.proc.pid}: no {what} within 120 s")
        tag, value = self.conn.recv()
        if tag == "err":
            raise value
        assert tag == wanted, (tag, value)
        return value

    def wait_hook(self) -> str:
        return self._expect("hook", "hook")

    def go(self) -> None:
        self.conn.send("go")

    def result(self):
        return self._expect("reply", "ok")

    def kill(self) -> None:
        """SIGKILL: no cleanup at all (no unregister, no commit, pings just stop)."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(30)

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
        self.conn.close()
