"""The server front end against the embedded engine, measured in the same run.

* LOOKUP round trip (p50, p99) for 1..128 chunks hit: ``CacheClient.lookup`` through a spawned
  ``gpukv serve`` on ipc:// versus ``CacheEngine.lookup`` in-process (both hash the prompt).
* STORE and RETRIEVE GB/s of an 8k-token prompt (Llama-3.1-8B-like pages, layers scaled down in
  the quick preset): the server packs straight out of the client's shared-memory pages, versus
  the embedded engine on the same kind of pages.

Each point runs with 1, 2 and 4 concurrent clients: client *processes* for the server, threads
on one engine for the embedded case. Ratios are server / embedded (latency: lower is better;
GB/s: higher is better). The transport floor is measured too: a bare pyzmq ROUTER echo process
answered by the same client processes (``echo p50``), so the server's own overhead is visible.
CSV + PNG under perf/results/cpu/.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import MODELS, progress, results_dir, write_csv  # noqa: E402

from gpukv import CacheClient, CacheEngine, EngineConfig  # noqa: E402
from gpukv.frontend.server import ServerProcess  # noqa: E402
from gpukv.frontend.shm import ShmAllocator  # noqa: E402

PRESETS = {
    "quick": dict(chunks=[1, 2, 4, 8, 16, 32, 64, 128], lookups=150, tokens=8192, layers=4,
                  repeats=3, clients=[1, 2, 4]),
    "full": dict(chunks=[1, 2, 4, 8, 16, 32, 64, 128], lookups=1000, tokens=8192, layers=32,
                 repeats=5, clients=[1, 2, 4]),
}
CHUNK = 256
BLOCK = 16
LOOKUP_SHAPE = (128 * CHUNK // BLOCK, BLOCK, 64)  # tiny MLA pages: lookups never touch bytes


def mha_shape(num_tokens: int) -> tuple[int, ...]:
    m = MODELS["llama3.1-8b"]
    return (num_tokens // BLOCK, 2, BLOCK, m["num_heads"], m["head_dim"])


class Bench:
    """One client (a CacheClient or the embedded engine) with its own pages and prompts."""

    def __init__(self, cache, name: str, preset: dict, alloc) -> None:
        """``name``: a letter and a client number (``c0``, ``e3``)."""
        self.cache, self.name, self.p = cache, name, preset
        self.tokens = preset["tokens"]
        lk = [alloc(LOOKUP_SHAPE, torch.bfloat16)]
        self.pages = [alloc(mha_shape(self.tokens), torch.bfloat16)
                      for _ in range(preset["layers"])]
        for t in self.pages:
            t.view(torch.int16).random_(-1000, 1000)
        cache.register(f"{name}-lk", "lookup-model", lk, "NB,BS,D", kind="mla")
        cache.register(f"{name}-kv", "kv-model", self.pages, "NB,2,BS,H,D", kind="mha")
        self.slots = torch.arange(self.tokens)
        self.prompt = self._prompt(10_000, 128 * CHUNK)
        cache.store(f"{name}-lk", self.prompt, torch.arange(len(self.prompt)))
        self.nbytes = sum(t.numel() * t.element_size() for t in self.pages)
        self.round = 0

    def _prompt(self, salt: int, n: int) -> list[int]:
        base = int(self.name[1:]) * 1_000_000_000 + salt * 100_000  # disjoint per client
        return list(range(base, base + n))

    def lookups(self, chunks: int) -> list[float]:
        tokens, out = self.prompt[: chunks * CHUNK], []
        for i in range(self.p["lookups"]):
            req = f"{self.name}-{chunks}-{i}"
            t0 = time.perf_counter()
            hit = self.cache.lookup("lookup-model", tokens, request_id=req, tp_size=1)
            out.append(time.perf_counter() - t0)
            assert hit == len(tokens), (hit, len(tokens))
            self.cache.end_session(req)
        return out

    def transfer(self) -> tuple[float, float]:
        """Seconds of one STORE of a new 8k prompt and one RETRIEVE of it."""
        self.round += 1
        tokens = self._prompt(self.round, self.tokens)
        t0 = time.perf_counter()
        assert self.cache.store(f"{self.name}-kv", tokens, self.slots) == self.tokens
        t_store = time.perf_counter() - t0
        req = f"{self.name}-r{self.round}"
        assert self.cache.lookup("kv-model", tokens, request_id=req) == self.tokens
        t0 = time.perf_counter()
        got = self.cache.retrieve(f"{self.name}-kv", tokens, self.slots, request_id=req)
        assert got == self.tokens, got
        t_retrieve = time.perf_counter() - t0
        self.cache.end_session(req)
        return t_store, t_retrieve


ECHO = """
import sys, zmq
sock = zmq.Context().socket(zmq.ROUTER)
sock.bind(sys.argv[1])
while True:
    sock.send_multipart(sock.recv_multipart())
"""


def _echo_latencies(sock, count: int) -> list[float]:
    out = []
    for _ in range(count):
        t0 = time.perf_counter()
        sock.send(b"x" * 64)
        sock.recv()
        out.append(time.perf_counter() - t0)
    return out


def _client_main(conn, address: str, echo_address: str, name: str, preset: dict) -> None:
    import zmq

    logging.disable(logging.INFO)
    echo = zmq.Context.instance().socket(zmq.DEALER)
    echo.connect(echo_address)
    with ShmAllocator() as shm, CacheClient(address, timeout_s=300) as client:
        bench = Bench(client, name, preset, shm.empty)
        conn.send("ready")
        while (cmd := conn.recv()) is not None:
            if cmd[0] == "echo":
                conn.send(_echo_latencies(echo, cmd[1]))
            else:
                conn.send(bench.lookups(cmd[1]) if cmd[0] == "lookup" else bench.transfer())
    echo.close(linger=0)


def run_all(targets, cmd) -> list:
    """Run ``cmd`` on every target at once (pipes of client processes, or Bench objects)."""
    if isinstance(targets[0], Bench):
        out = [None] * len(targets)

        def go(i: int) -> None:
            b = targets[i]
            out[i] = b.lookups(cmd[1]) if cmd[0] == "lookup" else b.transfer()

        threads = [threading.Thread(target=go, args=(i,)) for i in range(len(targets))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out
    for conn in targets:
        conn.send(cmd)
    return [conn.recv() for conn in targets]


def measure(targets, preset: dict, clients: int, nbytes: int) -> tuple[list, list]:
    lookup_rows, xfer_rows = [], []
    if not isinstance(targets[0], Bench):
        lat = sorted(x for xs in run_all(targets[:clients], ("echo", preset["lookups"]))
                     for x in xs)
        lookup_rows.append(dict(chunks=0, p50_us=1e6 * statistics.median(lat),
                                p99_us=1e6 * lat[int(0.99 * (len(lat) - 1))]))
    for chunks in preset["chunks"]:
        lat = sorted(x for xs in run_all(targets[:clients], ("lookup", chunks)) for x in xs)
        lookup_rows.append(dict(chunks=chunks, p50_us=1e6 * statistics.median(lat),
                                p99_us=1e6 * lat[int(0.99 * (len(lat) - 1))]))
    run_all(targets[:clients], ("transfer",))  # warm-up
    walls, per = [], []
    for _ in range(preset["repeats"]):
        t0 = time.perf_counter()
        res = run_all(targets[:clients], ("transfer",))
        walls.append(time.perf_counter() - t0)
        per.append(res)
    store = statistics.median([max(r[0] for r in res) for res in per])
    retrieve = statistics.median([max(r[1] for r in res) for res in per])
    xfer_rows.append(dict(store_gbps=clients * nbytes / store / 1e9,
                          retrieve_gbps=clients * nbytes / retrieve / 1e9))
    return lookup_rows, xfer_rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    logging.disable(logging.INFO)
    max_clients = max(preset["clients"])
    tokens_bytes = preset["layers"] * 2 * preset["tokens"] * MODELS["llama3.1-8b"]["num_heads"] * \
        MODELS["llama3.1-8b"]["head_dim"] * 2
    capacity = 2 * max_clients * (tokens_bytes + 128 * CHUNK * 128) + (64 << 20)
    lookup_csv, xfer_csv = [], []
    with tempfile.TemporaryDirectory(prefix="gpukv-sweep-") as tmp, ShmAllocator() as shm:
        address, echo_address = f"ipc://{tmp}/gpukv.sock", f"ipc://{tmp}/echo.sock"
        echo = subprocess.Popen([sys.executable, "-c", ECHO, echo_address])
        ctx = multiprocessing.get_context("spawn")
        pipes, procs = [], []
        for i in range(max_clients):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_client_main,
                               args=(theirs, address, echo_address, f"c{i}", preset), daemon=True)
            proc.start()
            pipes.append(mine)
            procs.append(proc)
        server = ServerProcess(address, capacity_bytes=capacity, device="cpu", chunk_size=CHUNK,
                               threads=max_clients)
        engine = CacheEngine(EngineConfig(capacity_bytes=capacity, device="cpu", chunk_size=CHUNK))
        try:
            assert all(p.recv() == "ready" for p in pipes)
            benches = [Bench(engine, f"e{i}", preset, shm.empty) for i in range(max_clients)]
            nbytes = benches[0].nbytes
            for clients in progress(preset["clients"], desc="clients"):
                (floor, *s_lk), s_x = measure(pipes, preset, clients, nbytes)
                e_lk, e_x = measure(benches, preset, clients, nbytes)
                for s, e in zip(s_lk, e_lk):
                    lookup_csv.append(dict(clients=clients, chunks=s["chunks"],
                                           echo_p50_us=round(floor["p50_us"], 1),
                                           echo_p99_us=round(floor["p99_us"], 1),
                                           server_p50_us=round(s["p50_us"], 1),
                                           server_p99_us=round(s["p99_us"], 1),
                                           embedded_p50_us=round(e["p50_us"], 1),
                                           embedded_p99_us=round(e["p99_us"], 1),
                                           ratio_p50=round(s["p50_us"] / e["p50_us"], 2)))
                for op in ("store", "retrieve"):
                    s, e = s_x[0][f"{op}_gbps"], e_x[0][f"{op}_gbps"]
                    xfer_csv.append(dict(op=op, clients=clients, tokens=preset["tokens"],
                                         mbytes_per_client=round(nbytes / 1e6, 1),
                                         server_gbps=round(s, 2), embedded_gbps=round(e, 2),
                                         ratio=round(s / e, 2)))
        finally:
            for p in pipes:
                p.send(None)
            for proc in procs:
                proc.join(30)
            server.stop()
            engine.close()
            echo.kill()
            echo.wait()
    out = results_dir("cpu")
    paths = [write_csv(out / "sweep_server_lookup.csv", lookup_csv),
             write_csv(out / "sweep_server_transfer.csv", xfer_csv), out / "sweep_server.png"]
    _plot(lookup_csv, xfer_csv, paths[2])
    _print(lookup_csv, xfer_csv)
    for path in paths:
        print(path)
    return 0


def _plot(lookup_csv: list[dict], xfer_csv: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for clients in sorted({r["clients"] for r in lookup_csv}):
        rows = [r for r in lookup_csv if r["clients"] == clients]
        x = [r["chunks"] for r in rows]
        ax1.plot(x, [r["server_p50_us"] for r in rows], "o-", label=f"server p50, {clients} cl")
        ax1.plot(x, [r["embedded_p50_us"] for r in rows], "x--", label=f"embedded, {clients} cl")
        ax1.plot(x, [r["echo_p50_us"] for r in rows], ":", label=f"zmq echo, {clients} cl")
    ax1.axhline(200, color="gray", lw=0.8, ls=":")
    ax1.set(xscale="log", yscale="log", xlabel="chunks hit", ylabel="LOOKUP latency (us)",
            title="LOOKUP round trip (ipc://)")
    ax1.legend(fontsize=7)
    labels = [f"{r['op']}\n{r['clients']} cl" for r in xfer_csv]
    pos = range(len(xfer_csv))
    ax2.bar([p - 0.2 for p in pos], [r["server_gbps"] for r in xfer_csv], 0.4, label="server")
    ax2.bar([p + 0.2 for p in pos], [r["embedded_gbps"] for r in xfer_csv], 0.4, label="embedded")
    ax2.set_xticks(list(pos), labels, fontsize=7)
    ax2.set(ylabel="GB/s (all clients)", title=f"STORE / RETRIEVE, {xfer_csv[0]['tokens']} tokens")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _print(lookup_csv: list[dict], xfer_csv: list[dict]) -> None:
    print(f"{'clients':>7} {'chunks':>6} {'echo p50':>9} {'srv p50':>9} {'srv p99':>9} "
          f"{'emb p50':>9} {'emb p99':>9} {'ratio':>6}   (us)")
    for r in lookup_csv:
        print(f"{r['clients']:7d} {r['chunks']:6d} {r['echo_p50_us']:9.1f} "
              f"{r['server_p50_us']:9.1f} {r['server_p99_us']:9.1f} {r['embedded_p50_us']:9.1f} "
              f"{r['embedded_p99_us']:9.1f} {r['ratio_p50']:6.2f}")
    print(f"\n{'op':9} {'clients':>7} {'tokens':>6} {'MB/cl':>7} {'server GB/s':>11} "
          f"{'embedded GB/s':>13} {'ratio':>6}")
    for r in xfer_csv:
        print(f"{r['op']:9} {r['clients']:7d} {r['tokens']:6d} {r['mbytes_per_client']:7.1f} "
              f"{r['server_gbps']:11.2f} {r['embedded_gbps']:13.2f} {r['ratio']:6.2f}")


if __name__ == "__main__":
    sys.exit(main())
