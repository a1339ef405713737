"""The processes :mod:`sweep_server` measures with: a bare pyzmq echo (the transport's floor), a
gpukv server with metrics on or off, and a worker process holding a KV cache of its own that
talks to the server (``CacheClient``) and to an embedded ``CacheEngine`` of its own, on command
from the sweep (a pipe carries commands and timings, nothing else)."""

from __future__ import annotations

import itertools
import logging
import os
import socket
import subprocess
import sys
import time
from typing import Callable

import torch

from gpukv import CacheClient, CacheEngine, EngineConfig
from gpukv.frontend import protocol as p
from gpukv.frontend.client import ServerUnavailable

CHUNK = 256
BLOCK = 16
LOOKUP_MODEL, LOOKUP_CHUNKS = "lookup-model", 128
LOOKUP_PAGES = (LOOKUP_CHUNKS * CHUNK // BLOCK, BLOCK, 64)  # tiny MLA rows: lookups touch no bytes
KV_HEADS, KV_HEAD_DIM = 8, 128  # Llama-3.1-8B per rank (layers scaled by the preset)
CAPACITY_PROMPTS = 2.2  # L1 of a worker's prompts in the transfer runs: new stores evict the oldest


def first_store_capacity(prompt_bytes: int) -> int:
    """An L1 of two prompts and less than a chunk: a third store goes wholly into the slots of
    the first, which it evicts (nothing of it lands in memory never written)."""
    return 2 * prompt_bytes + (4 << 20)

ECHO = """
import sys, zmq
sock = zmq.Context().socket(zmq.ROUTER)
sock.bind(sys.argv[1])
while True:
    sock.send_multipart(sock.recv_multipart())
"""

SERVE = """
import signal, sys
from gpukv.config import EngineConfig
from gpukv.engine.core import CacheCore
from gpukv.frontend.server import CacheServer, ServerConfig
address, capacity, metrics = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "on"
core = CacheCore(EngineConfig(capacity_bytes=capacity, device="cpu", chunk_size=256,
                              metrics=metrics), shared=True)
server = CacheServer(core, ServerConfig(address=address))
sys.setswitchinterval(0.001)  # as gpukv serve does
signal.signal(signal.SIGTERM, lambda *_: server.stop())
server.serve_forever()
core.close()
"""


def free_tcp_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def start_echo(address: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", ECHO, address])


def start_server(address: str, capacity: int, *, metrics: bool) -> subprocess.Popen:
    """A gpukv server process like ``gpukv serve`` (its config only differs by ``metrics``),
    answering pings when this returns."""
    proc = subprocess.Popen([sys.executable, "-c", SERVE, address, str(capacity),
                             "on" if metrics else "off"])
    deadline = time.monotonic() + 120
    while True:
        try:
            with CacheClient(address, connect_timeout_s=0.5, ping_interval_s=0):
                return proc
        except ServerUnavailable:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"server on {address} did not start") from None
            time.sleep(0.05)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def peer_cpu() -> int:
    """The CPU the compared peers (echo and server processes) are pinned to: the last one this
    process may use. Each process otherwise lands where the scheduler puts it, and a peer on the
    busier core answers slower throughout (one run: 15 %)."""
    return max(os.sched_getaffinity(0))


def pin(pid: int, cpu: int) -> None:
    """Pin every thread of process ``pid`` (the loop, zmq's I/O thread, ...) to ``cpu``; threads
    it starts later inherit it."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), {cpu})


def lookup_frame_bytes(chunks: int) -> int:
    """Bytes of the LOOKUP request a client sends for ``chunks`` hashes (the echo sends as many)."""
    body = p.Lookup(LOOKUP_MODEL, "r-000000", [bytes(16)] * chunks, 1, None)
    return len(p.encode_request(1 << 20, "s" * 32, body))


def prepare_lookups(cache, name: str, base: int) -> list[int]:
    """Register the tiny MLA model on ``cache`` (a CacheClient or CacheEngine) and store a
    128-chunk prompt of tokens from ``base``; returns the prompt."""
    cache.register(f"{name}-lk", LOOKUP_MODEL, [torch.zeros(LOOKUP_PAGES, dtype=torch.bfloat16)],
                   "NB,BS,D", kind="mla")
    prompt = list(range(base, base + LOOKUP_CHUNKS * CHUNK))
    assert cache.store(f"{name}-lk", prompt, torch.arange(len(prompt))) == len(prompt)
    return prompt


def lookup_call(cache, tokens, ids: Callable[[], str], *, hashes: bool = False) -> Callable[[], None]:
    """One LOOKUP of ``tokens`` (token ids, or chunk hashes with ``hashes``) under a new request,
    asserting every chunk hit; the request ends in the next call's untimed part (``pending``)."""
    pending: list[str] = []
    want = len(tokens) * (CHUNK if hashes else 1)
    lookup = cache.lookup_hashes if hashes else cache.lookup

    def call() -> None:
        rid = ids()
        hit = lookup(LOOKUP_MODEL, tokens, request_id=rid)
        assert hit == want, (hit, want)
        pending.append(rid)

    def end() -> None:
        while pending:
            cache.end_session(pending.pop())

    call.end = end  # type: ignore[attr-defined]
    return call


def handler_call(core, hashes: list[bytes], ids: Callable[[], str]) -> Callable[[], None]:
    """The server's work for one LOOKUP, in this process: decode the request frame, run the
    handler on ``core`` (a CacheCore holding the prompt, with a session of its own), encode the
    reply. The frame is built untimed (``setup``), the request ended untimed (``end``)."""
    from gpukv.frontend.sessions import Sessions

    sessions, sid = Sessions(core), "s" * 32
    sessions.touch(sid, None)
    state: dict = {}

    def setup() -> None:
        state["rid"] = ids()
        state["frame"] = p.encode_request(1, sid, p.Lookup(LOOKUP_MODEL, state["rid"], hashes, 1, None))

    def call() -> None:
        request = p.decode_request(state["frame"])
        p.encode_reply(p.ok_reply(request.seq, sessions.handle(sid, request.body)))

    call.setup, call.end = setup, lambda: sessions.handle(sid, p.EndSession(state["rid"]))  # type: ignore[attr-defined]
    return call


def alternate(calls: dict[str, Callable[[], None]], count: int, *,
              reverse: bool = True) -> dict[str, list[float]]:
    """``count`` timed calls of each, alternating call by call (A B C, C B A, ...; with
    ``reverse`` False A B C, A B C: every call then follows the same others); a call's ``setup``
    / ``end`` (if any) run untimed right before / after it."""
    names, clock = list(calls), time.perf_counter
    out: dict[str, list[float]] = {n: [] for n in names}
    for i in range(count):
        for name in names if i % 2 == 0 or not reverse else reversed(names):
            fn = calls[name]
            setup = getattr(fn, "setup", None)
            if setup is not None:
                setup()
            t0 = clock()
            fn()
            out[name].append(clock() - t0)
            end = getattr(fn, "end", None)
            if end is not None:
                end()
    return out


def kv_pages(num_tokens: int, layers: int) -> list[torch.Tensor]:
    """Llama-3.1-8B-like ``2,NB,BS,H,D`` bf16 pages of ``num_tokens`` slots, random bytes."""
    pages = [torch.empty(2, num_tokens // BLOCK, BLOCK, KV_HEADS, KV_HEAD_DIM, dtype=torch.bfloat16)
             for _ in range(layers)]
    for t in pages:
        t.view(torch.int16).random_(-1000, 1000)
    return pages


class Worker:
    """One worker's caches and prompts (runs in its own process; see :func:`worker_main`)."""

    def __init__(self, index: int, address: str, echo_address: str, preset: dict) -> None:
        import zmq

        torch.set_num_threads(preset["worker_threads"])
        self.index, self.tokens, self.preset = index, preset["tokens"], preset
        self.pages = kv_pages(self.tokens, preset["layers"])
        self.nbytes = sum(t.numel() * t.element_size() for t in self.pages)
        self.slots = torch.arange(self.tokens)
        self.client = CacheClient(address, timeout_s=300)
        self.engine = self._engine(prefault=True)
        self.echo = zmq.Context.instance().socket(zmq.DEALER)
        self.echo.connect(echo_address)
        for cache in (self.client, self.engine):
            cache.register("kv", "kv-model", self.pages, "2,NB,BS,H,D", kind="mha")
        self.lookup_prompt = prepare_lookups(self.client, "w", self._base(0))
        self.round, self.current = 0, {}
        self._ids = map(f"w{index}-lk{{}}".format, itertools.count()).__next__

    def _engine(self, *, prefault: bool, capacity: int | None = None) -> CacheEngine:
        capacity = capacity or int(CAPACITY_PROMPTS * self.nbytes) + (16 << 20)
        return CacheEngine(EngineConfig(capacity_bytes=capacity, device="cpu", chunk_size=CHUNK,
                                        prefault=prefault))

    def _base(self, salt: int) -> int:
        return self.index * 1_000_000_000 + salt * 100_000  # disjoint per worker and round

    def _prompt(self) -> list[int]:
        self.round += 1
        return list(range(self._base(self.round), self._base(self.round) + self.tokens))

    def prepare(self, op: str, mode: str) -> None:
        """What ``op`` needs first, untimed: a new prompt for a store; the lookup of the last
        stored prompt for a retrieve (``mode``: "server" or "embedded")."""
        if op == "store":
            self.current[mode] = self._prompt()
        else:
            cache = self.client if mode == "server" else self.engine
            self.rid = f"w{self.index}-r{self.round}-{mode}"
            assert cache.lookup("kv-model", self.current[mode], request_id=self.rid) == self.tokens

    def store(self, mode: str) -> float:
        """Seconds of one STORE of the prepared prompt."""
        cache = self.client if mode == "server" else self.engine
        t0 = time.perf_counter()
        assert cache.store("kv", self.current[mode], self.slots) == self.tokens
        return time.perf_counter() - t0

    def retrieve(self, mode: str) -> float:
        """Seconds of one RETRIEVE of the last stored prompt (looked up by ``prepare``)."""
        cache = self.client if mode == "server" else self.engine
        t0 = time.perf_counter()
        assert cache.retrieve("kv", self.current[mode], self.slots, request_id=self.rid) == self.tokens
        return time.perf_counter() - t0

    def cleanup(self, op: str, mode: str) -> None:
        """After a retrieve, untimed: end its request."""
        if op == "retrieve":
            (self.client if mode == "server" else self.engine).end_session(self.rid)

    def lookups(self, chunks: int, count: int) -> dict[str, list[float]]:
        frame = b"x" * lookup_frame_bytes(chunks)

        def echo() -> None:
            self.echo.send(frame)
            self.echo.recv()

        return alternate({"echo": echo, "gpukv": lookup_call(
            self.client, self.lookup_prompt[:chunks * CHUNK], self._ids)}, count, reverse=False)

    def first_store(self, where: str) -> tuple[float, float]:
        """Seconds of the first store into a new L1 and of a warm one (the third, into the first
        one's slots): ``where`` is a new server's address, "embedded" or "embedded-noprefault"."""
        if where.startswith(("ipc://", "tcp://")):
            cache = CacheClient(where, timeout_s=300, ping_interval_s=0)
            cache.register("kv", "kv-model", self.pages, "2,NB,BS,H,D", kind="mha")
        else:
            cache = self._engine(prefault=where == "embedded",
                                 capacity=first_store_capacity(self.nbytes))
            cache.register("kv", "kv-model", self.pages, "2,NB,BS,H,D", kind="mha")
        times = []
        for _ in range(3):  # fresh, fresh (the rest of the arena), warm (evicts the first)
            tokens = self._prompt()
            t0 = time.perf_counter()
            assert cache.store("kv", tokens, self.slots) == self.tokens
            times.append(time.perf_counter() - t0)
        cache.close()
        return times[0], times[2]

    def close(self) -> None:
        self.client.close()
        self.engine.close()
        self.echo.close(linger=0)


def worker_main(conn, index: int, address: str, echo_address: str, preset: dict) -> None:
    """A worker process: builds a :class:`Worker`, then runs ``(method, *args)`` commands from
    ``conn`` and sends back their results until it receives None."""
    logging.disable(logging.INFO)
    worker = Worker(index, address, echo_address, preset)
    conn.send(worker.nbytes)
    while (cmd := conn.recv()) is not None:
        conn.send(getattr(worker, cmd[0])(*cmd[1:]))
    worker.close()
