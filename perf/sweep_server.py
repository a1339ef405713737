"""The server front end against its floors, measured in the same run (issues 12 and 15).

* LOOKUP latency, one client, ipc:// and tcp://, 1..128 chunks hit (token ids in, hashing
  included): ``CacheClient.lookup`` through ``gpukv serve`` vs a bare pyzmq ROUTER echo of a frame
  as large as the LOOKUP request (the transport's floor) vs ``CacheEngine.lookup`` in-process;
  Goals: p50 <= 2.5x the echo at 32 chunks, <= 6x at 128; p99 <= 3x p50 on an idle machine.
  Where a LOOKUP goes, beside it: round trips of an echo, a PING and a LOOKUP with the hashes
  given (``lookup_hashes``), in turn; in process, on the same state: the client's token list ->
  int64 and all its hashing, the server's decode + handler + encode, the embedded lookup.
* LOOKUP with 1, 2, 4 client processes at once (each alternating echo and gpukv calls).
* Metrics cost end to end: LOOKUP through two servers alike but for ``EngineConfig(metrics=...)``,
  calls alternating; goal on / off <= 1.05.
* STORE and RETRIEVE of 8k tokens (Llama-3.1-8B-like pages, layers scaled by the preset) by 1, 2,
  4 worker processes at once, through the server (the worker packs into the server's shared
  arena) vs each worker's own embedded engine (packs into a private arena); goal >= 0.95x.
* First store into a fresh L1 vs a warm one (the third store of the same L1, into the first's
  slots), through a new server and embedded (prefault on, and off to show what it fixes);
  goal fresh / warm >= 0.8.

Method: subjects alternate call by call (latency; the echo and gpukv strictly ABAB, so each
peer idles as long between its calls: an idle peer's wake-up costs tens of µs on a VM) or phase
by phase (transfers: ABAB, BABA);
thread settings fixed (1 torch thread per worker) and printed; min / median / max over repeats;
the load average printed and kept per row. CSVs + PNG under perf/results/cpu/.
"""

from __future__ import annotations

import os

THREAD_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_NUM_THREADS": "1"}  # see sweep_kernels
for _k, _v in THREAD_ENV.items():
    os.environ.setdefault(_k, _v)

import argparse  # noqa: E402
import itertools  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import zmq  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import server_bench as sb  # noqa: E402
from common import load_average, progress, quantile, results_dir, spread, thread_settings, write_csv  # noqa: E402
from server_transfers import LOOKUP_CAPACITY, workers_part  # noqa: E402
from sweep_server_report import plot, print_tables  # noqa: E402

from gpukv import CacheClient, CacheEngine, EngineConfig  # noqa: E402
from gpukv.engine.keys import as_token_array, chunk_hashes, request_seed  # noqa: E402
from gpukv.frontend.process import ServerProcess  # noqa: E402

PRESETS = {
    "quick": dict(chunks=[1, 8, 32, 128], lookups=300, repeats=5, multi_chunks=[32, 128],
                  multi_lookups=200, metrics_chunks=[1, 32, 128], workers=[1, 2, 4], tokens=8192,
                  layers=8, worker_threads=1, xfer_repeats=9, first_repeats=3),
    "full": dict(chunks=[1, 2, 4, 8, 16, 32, 64, 128], lookups=1000, repeats=7,
                 multi_chunks=[1, 32, 128], multi_lookups=500, metrics_chunks=[1, 32, 128],
                 workers=[1, 2, 4], tokens=8192, layers=16, worker_threads=1, xfer_repeats=7,
                 first_repeats=5),
}
GOALS_VS_ECHO = {32: 2.5, 128: 6.0}
# the profile's parts: an echo and a PING round trip beside the LOOKUP with hashes given; the
# client's token list -> int64 and all its hashing; the server's decode + handler + encode
PROFILE = ("echo_ctx", "ping", "convert", "hash", "handler")


def _p50s(samples: dict[str, list[list[float]]]) -> dict[str, dict]:
    """Per subject: p50 of each repeat (µs) -> min / median / max, and p99 over all calls."""
    out = {}
    for name, reps in samples.items():
        p50 = spread([1e6 * statistics.median(r) for r in reps])
        out[name] = dict(p50=p50, p99=1e6 * quantile([x for r in reps for x in r], 0.99))
    return out


def _lookup_row(transport: str, clients: int, chunks: int, samples: dict, repeats: int,
                calls: int, peer_cpu: int | str = "") -> dict:
    """One CSV row; ``peer_cpu``: the CPU the echo and the server were pinned to ("" if not)."""
    st = _p50s(samples)
    e, g = st["echo"], st["gpukv"]
    ratios = spread([statistics.median(a) / statistics.median(b)
                     for a, b in zip(samples["gpukv"], samples["echo"])])
    row = dict(transport=transport, clients=clients, chunks=chunks,
               frame_bytes=sb.lookup_frame_bytes(chunks),
               echo_p50_us=e["p50"]["median"], echo_p50_min_us=e["p50"]["min"],
               echo_p50_max_us=e["p50"]["max"], echo_p99_us=e["p99"],
               gpukv_p50_us=g["p50"]["median"], gpukv_p50_min_us=g["p50"]["min"],
               gpukv_p50_max_us=g["p50"]["max"], gpukv_p99_us=g["p99"],
               hashes_p50_us=st["hashes"]["p50"]["median"] if "hashes" in st else "",
               embedded_p50_us=st["embedded"]["p50"]["median"] if "embedded" in st else "",
               embedded_p99_us=st["embedded"]["p99"] if "embedded" in st else "",
               **{f"{k}_p50_us": st[k]["p50"]["median"] if k in st else "" for k in PROFILE},
               ratio_vs_echo=ratios["median"], ratio_vs_echo_min=ratios["min"],
               ratio_vs_echo_max=ratios["max"], goal_vs_echo=GOALS_VS_ECHO.get(chunks, ""),
               p99_over_p50=g["p99"] / g["p50"]["median"],
               ratio_vs_embedded=(g["p50"]["median"] / st["embedded"]["p50"]["median"]
                                  if "embedded" in st else ""),
               repeats=repeats, calls=calls, peer_cpu=peer_cpu, loadavg_1m=load_average()[0])
    return row


def lookup_single(preset: dict, tmp: str, transport: str) -> list[dict]:
    """One client in this process: the echo and gpukv LOOKUP (token ids in) in turn, then the
    profile's parts (see ``blocks``)."""
    if transport == "ipc":
        address, echo_address = f"ipc://{tmp}/lk.sock", f"ipc://{tmp}/lk-echo.sock"
    else:
        address, echo_address = sb.free_tcp_address(), sb.free_tcp_address()
    echo_proc = sb.start_echo(echo_address)
    rows = []
    with ServerProcess(address, capacity_bytes=LOOKUP_CAPACITY, chunk_size=sb.CHUNK) as server, \
            CacheClient(server.address) as client, \
            CacheEngine(EngineConfig(capacity_bytes=LOOKUP_CAPACITY, device="cpu",
                                     chunk_size=sb.CHUNK)) as engine:
        cpu = sb.peer_cpu()  # the echo and the server side by side (see peer_cpu)
        sb.pin(echo_proc.pid, cpu)
        sb.pin(server.pid, cpu)
        prompt = sb.prepare_lookups(client, "c", 10_000_000)
        assert sb.prepare_lookups(engine, "e", 10_000_000) == prompt
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.connect(echo_address)
        ids = map(str, itertools.count()).__next__
        for chunks in progress(preset["chunks"], desc=f"lookup {transport}"):
            tokens = prompt[:chunks * sb.CHUNK]
            hashes = chunk_hashes(tokens, sb.CHUNK, seed=request_seed(client.salt, b""))
            frame = b"x" * sb.lookup_frame_bytes(chunks)

            def echo() -> None:
                sock.send(frame)
                sock.recv()

            seed = request_seed(client.salt, b"")
            blocks = [  # the goal's pair strictly ABAB (an idle peer wakes slower: equal gaps),
                # then where a LOOKUP's time goes: the round trips beside the echo, then the
                # client's and the server's work in process, each block alternating
                ({"echo": echo, "gpukv": sb.lookup_call(client, tokens, ids)}, False),
                ({"echo_ctx": echo, "ping": client.ping,
                  "hashes": sb.lookup_call(client, hashes, ids, hashes=True)}, True),
                ({"embedded": sb.lookup_call(engine, tokens, ids),
                  "convert": lambda: as_token_array(tokens),
                  "hash": lambda: chunk_hashes(tokens, sb.CHUNK, seed=seed),
                  "handler": sb.handler_call(engine.core, hashes, ids)}, True)]
            samples: dict[str, list] = {name: [] for calls, _ in blocks for name in calls}
            for r in range(1 + preset["repeats"]):  # the first round warms up
                for calls, reverse in blocks:
                    for name, times in sb.alternate(calls, preset["lookups"] if r else 20,
                                                    reverse=reverse).items():
                        if r:
                            samples[name].append(times)
            rows.append(_lookup_row(transport, 1, chunks, samples, preset["repeats"],
                                    preset["lookups"], cpu))
        sock.close(linger=0)
    sb.stop(echo_proc)
    return rows


def metrics_cost(preset: dict, tmp: str) -> list[dict]:
    """LOOKUP through a server with metrics on vs one with metrics off, calls alternating. Both
    servers are pinned to the same CPU (:func:`server_bench.peer_cpu`)."""
    procs = {m: sb.start_server(f"ipc://{tmp}/metrics-{m}.sock", LOOKUP_CAPACITY, metrics=m == "on")
             for m in ("off", "on")}
    cpu = sb.peer_cpu()
    for proc in procs.values():
        sb.pin(proc.pid, cpu)
    rows = []
    try:
        clients = {m: CacheClient(f"ipc://{tmp}/metrics-{m}.sock") for m in procs}
        prompts = {m: sb.prepare_lookups(c, m, 20_000_000) for m, c in clients.items()}
        ids = map(str, itertools.count()).__next__
        for chunks in preset["metrics_chunks"]:
            calls = {m: sb.lookup_call(clients[m], prompts[m][:chunks * sb.CHUNK], ids) for m in procs}
            sb.alternate(calls, 20)
            reps = [sb.alternate(calls, preset["lookups"]) for _ in range(preset["repeats"])]
            off = spread([1e6 * statistics.median(r["off"]) for r in reps])
            on = spread([1e6 * statistics.median(r["on"]) for r in reps])
            ratio = spread([statistics.median(r["on"]) / statistics.median(r["off"]) for r in reps])
            rows.append(dict(chunks=chunks, off_p50_us=off["median"], off_p50_min_us=off["min"],
                             off_p50_max_us=off["max"], on_p50_us=on["median"],
                             on_p50_min_us=on["min"], on_p50_max_us=on["max"],
                             ratio=ratio["median"], ratio_min=ratio["min"], ratio_max=ratio["max"],
                             goal=1.05, repeats=preset["repeats"], calls=preset["lookups"],
                             peer_cpu=cpu,
                             loadavg_1m=load_average()[0]))
        for c in clients.values():
            c.close()
    finally:
        for proc in procs.values():
            sb.stop(proc)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--only", choices=["lookup", "metrics", "workers"], nargs="*", default=None)
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    parts = args.only or ["lookup", "metrics", "workers"]
    logging.disable(logging.INFO)
    torch.set_num_threads(1)
    print(f"thread settings: {thread_settings()} (this process and each worker); "
          f"load average before: {load_average()}", flush=True)
    out = results_dir("cpu")
    written = []
    with tempfile.TemporaryDirectory(prefix="gpukv-sweep-") as tmp:
        lookup_rows, xfer_rows, first_rows, metric_rows = [], [], [], []
        if "lookup" in parts:
            for transport in progress(["ipc", "tcp"], desc="lookup"):
                lookup_rows += lookup_single(preset, tmp, transport)
        if "metrics" in parts:
            metric_rows = metrics_cost(preset, tmp)
        if "workers" in parts:
            multi, xfer_rows, first_rows = workers_part(preset, tmp, _lookup_row)
            lookup_rows += multi
    for name, rows in (("lookup", lookup_rows), ("metrics", metric_rows),
                       ("transfer", xfer_rows), ("first_store", first_rows)):
        if rows:
            written.append(write_csv(out / f"sweep_server_{name}.csv", rows))
    if len(parts) == 3:
        written.append(plot(lookup_rows, metric_rows, xfer_rows, first_rows, out / "sweep_server.png"))
    print_tables(lookup_rows, metric_rows, xfer_rows, first_rows)
    print(f"thread settings: {thread_settings()}; load average after: {load_average()}")
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
