"""The worker-process parts of :mod:`sweep_server`: LOOKUP by 1, 2, 4 clients at once, STORE /
RETRIEVE through the server vs each worker's embedded engine, and the first store into a fresh
L1 vs a warm one. The workers themselves are :class:`server_bench.Worker` processes."""

from __future__ import annotations

import multiprocessing
import time
from typing import Callable

import server_bench as sb
from common import load_average, progress, spread

from gpukv.frontend.process import ServerProcess

LOOKUP_CAPACITY = 256 << 20


class Workers:
    """``n`` worker processes (see :mod:`server_bench`) and their pipes."""

    def __init__(self, n: int, address: str, echo_address: str, preset: dict) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.pipes, self.procs = [], []
        for i in range(n):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=sb.worker_main, args=(theirs, i, address, echo_address, preset),
                               daemon=True)
            proc.start()
            self.pipes.append(mine)
            self.procs.append(proc)
        self.nbytes = [pipe.recv() for pipe in self.pipes][0]

    def all(self, n: int, *cmd) -> list:
        """Run ``cmd`` on the first ``n`` workers at once; their results."""
        return self.timed(n, *cmd)[0]

    def timed(self, n: int, *cmd) -> tuple[list, float]:
        """``all``, and the seconds from the first command sent to the last result back (the
        workers' own times overlap only partly when they outnumber the cores)."""
        t0 = time.perf_counter()
        for pipe in self.pipes[:n]:
            pipe.send(cmd)
        results = [pipe.recv() for pipe in self.pipes[:n]]
        return results, time.perf_counter() - t0

    def close(self) -> None:
        for pipe in self.pipes:
            pipe.send(None)
        for proc in self.procs:
            proc.join(60)


def workers_part(preset: dict, tmp: str, lookup_row: Callable[..., dict]
                 ) -> tuple[list[dict], list[dict], list[dict]]:
    """Multi-client lookups (rows made by ``lookup_row``), STORE / RETRIEVE server vs embedded,
    and the first store."""
    most = max(preset["workers"])
    address, echo_address = f"ipc://{tmp}/kv.sock", f"ipc://{tmp}/kv-echo.sock"
    echo_proc = sb.start_echo(echo_address)
    prompt_bytes = preset["layers"] * 2 * preset["tokens"] * sb.KV_HEADS * sb.KV_HEAD_DIM * 2
    capacity = int(most * sb.CAPACITY_PROMPTS * prompt_bytes) + most * LOOKUP_CAPACITY // 16 + (64 << 20)
    lookup_rows, xfer_rows, first_rows = [], [], []
    with ServerProcess(address, capacity_bytes=capacity, chunk_size=sb.CHUNK, threads=most):
        workers = Workers(most, address, echo_address, preset)
        try:
            for n in progress(preset["workers"], desc="workers"):
                for chunks in preset["multi_chunks"]:
                    workers.all(n, "lookups", chunks, 20)
                    samples = {"echo": [], "gpukv": []}
                    for _ in range(preset["repeats"]):
                        got = workers.all(n, "lookups", chunks, preset["multi_lookups"])
                        for name in samples:  # one repeat = every worker's calls
                            samples[name].append([x for g in got for x in g[name]])
                    lookup_rows.append(lookup_row("ipc", n, chunks, samples, preset["repeats"],
                                                  n * preset["multi_lookups"]))
                xfer_rows += transfers(workers, n, preset)
            first_rows = first_stores(workers, preset, tmp, prompt_bytes)
        finally:
            workers.close()
    sb.stop(echo_proc)
    return lookup_rows, xfer_rows, first_rows


def transfers(workers: Workers, n: int, preset: dict) -> list[dict]:
    """STORE then RETRIEVE by ``n`` workers at once, server and embedded phases alternating."""
    times = {(op, mode): [] for op in ("store", "retrieve") for mode in ("server", "embedded")}
    for r in range(2 + preset["xfer_repeats"]):  # 2 warm-up rounds fill every slot once
        for mode in ("server", "embedded") if r % 2 == 0 else ("embedded", "server"):
            for op in ("store", "retrieve"):
                workers.all(n, "prepare", op, mode)
                _, wall = workers.timed(n, op, mode)
                workers.all(n, "cleanup", op, mode)
                if r >= 2:
                    times[op, mode].append(wall)
    gb = n * workers.nbytes / 1e9
    rows = []
    for op in ("store", "retrieve"):
        s, e = times[op, "server"], times[op, "embedded"]
        ratio = spread([b / a for a, b in zip(s, e)])
        ss, es = spread(s), spread(e)
        rows.append(dict(op=op, workers=n, tokens=preset["tokens"], layers=preset["layers"],
                         mbytes_per_worker=workers.nbytes / 1e6, server_gbps=gb / ss["median"],
                         server_gbps_min=gb / ss["max"], server_gbps_max=gb / ss["min"],
                         embedded_gbps=gb / es["median"], embedded_gbps_min=gb / es["max"],
                         embedded_gbps_max=gb / es["min"], ratio=ratio["median"],
                         ratio_min=ratio["min"], ratio_max=ratio["max"], goal=0.95,
                         repeats=preset["xfer_repeats"], worker_threads=preset["worker_threads"],
                         loadavg_1m=load_average()[0]))
    return rows


def first_stores(workers: Workers, preset: dict, tmp: str, prompt_bytes: int) -> list[dict]:
    """Worker 0's first store into a new L1 vs its warm third store, per repeat and path."""
    capacity = sb.first_store_capacity(prompt_bytes)
    times: dict[str, list[tuple[float, float]]] = {"server": [], "embedded": [],
                                                   "embedded-noprefault": []}
    for r in range(preset["first_repeats"]):
        for path in list(times) if r % 2 == 0 else reversed(list(times)):
            if path == "server":
                with ServerProcess(f"ipc://{tmp}/first-{r}.sock", capacity_bytes=capacity,
                                   chunk_size=sb.CHUNK) as server:
                    times[path].append(workers.all(1, "first_store", server.address)[0])
            else:
                times[path].append(workers.all(1, "first_store", path)[0])
    gb = workers.nbytes / 1e9
    mechanism = {"server": "memfd, MADV_POPULATE_WRITE at creation; worker maps it MAP_POPULATE",
                 "embedded": "anonymous map, MADV_HUGEPAGE + MADV_POPULATE_WRITE at creation",
                 "embedded-noprefault": "anonymous map, MADV_HUGEPAGE only (prefault=False)"}
    rows = []
    for path, pairs in times.items():
        fresh, warm = spread([f for f, _ in pairs]), spread([w for _, w in pairs])
        ratio = spread([w / f for f, w in pairs])
        rows.append(dict(path=path, mechanism=mechanism[path], tokens=preset["tokens"],
                         mbytes=workers.nbytes / 1e6, fresh_gbps=gb / fresh["median"],
                         fresh_gbps_min=gb / fresh["max"], fresh_gbps_max=gb / fresh["min"],
                         warm_gbps=gb / warm["median"], warm_gbps_min=gb / warm["max"],
                         warm_gbps_max=gb / warm["min"], ratio=ratio["median"],
                         ratio_min=ratio["min"], ratio_max=ratio["max"], goal=0.8,
                         repeats=preset["first_repeats"], loadavg_1m=load_average()[0]))
    return rows
