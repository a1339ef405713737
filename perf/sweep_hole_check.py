"""What the server's hole check costs (:mod:`gpukv.frontend.holes`): RETRIEVE and STORE with the
check on against the same path with it off, measured in the same run, alternating.

* ``mincore``: the check of one chunk of the shared CPU arena alone (``mincore`` of its pages).
* ``books``: the server's RETRIEVE_BEGIN + RETRIEVE_END handlers for ``chunks`` chunks, in
  process (no socket, no copy): the part of a retrieve the check adds to.
* ``retrieve``: a whole ``CacheClient.retrieve`` through an in-process server (both round trips
  and the unpack of every chunk into the worker's pages), the path a worker waits for.
* ``store``: a whole ``CacheClient.store`` (the pack, and the check at STORE_COMMIT) into an
  emptied L1.

Realistic chunks (256 tokens of one rank of the models in ``common.MODELS``); the arena is
pre-faulted (no page is a hole until someone punches one). On and off run on the same server,
the same objects and the same pages: only the handler's ``HoleCheck`` is swapped. Reports
min / median / max and the on / off ratio of the medians; thread settings and the load average
are printed (the machine is shared).

    python perf/sweep_hole_check.py --preset quick    # ~1 min
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (MODELS, progress, results_dir, run_info, spread,  # noqa: E402
                    time_alternating, write_csv)

from gpukv.config import EngineConfig  # noqa: E402
from gpukv.engine.core import CacheCore  # noqa: E402
from gpukv.frontend.client import CacheClient  # noqa: E402
from gpukv.frontend.holes import HoleCheck, has_hole  # noqa: E402
from gpukv.frontend.server import CacheServer, ServerConfig  # noqa: E402
from gpukv.frontend.session import Limits  # noqa: E402

PRESETS = {
    "quick": dict(models=["deepseek-v3-mla", "llama3.1-8b"], chunks=[1, 8], repeats=25,
                  seeks=2000),
    "full": dict(models=["deepseek-v3-mla", "llama3.1-8b", "llama-70b-tp8"], chunks=[1, 4, 16],
                 repeats=41, seeks=20000),
}
CHUNK, BLOCK = 256, 16


def pages_of(model: str, num_tokens: int) -> tuple[list[torch.Tensor], str]:
    """Per-layer KV tensors (views of one buffer, random bits) holding ``num_tokens`` tokens."""
    m = MODELS[model]
    blocks = num_tokens // BLOCK
    if m["kind"] == "mla":
        shape, dims = (m["num_layers"], blocks, BLOCK, m["head_dim"]), "NB,BS,D"
    else:
        shape = (m["num_layers"], blocks, 2, BLOCK, m["num_heads"], m["head_dim"])
        dims = "NB,2,BS,H,D"
    buf = torch.empty(shape, dtype=m["dtype"])
    buf.view(torch.uint8).random_(0, 256)
    return [buf[i] for i in range(shape[0])], dims


def measure(model: str, chunks: int, preset: dict) -> list[dict]:
    m = MODELS[model]
    pages, dims = pages_of(model, 2 * chunks * CHUNK)  # stored from one half, read into the other
    tokens = list(range(chunks * CHUNK))
    store_slots, read_slots = torch.arange(chunks * CHUNK), torch.arange(chunks * CHUNK, 2 * chunks * CHUNK)
    kv = 1 if m["kind"] == "mla" else 2
    chunk_bytes = m["num_layers"] * kv * CHUNK * m["num_heads"] * m["head_dim"] * m["dtype"].itemsize
    capacity = chunks * chunk_bytes + (1 << 20)
    core = CacheCore(EngineConfig(capacity_bytes=capacity, device="cpu", chunk_size=CHUNK,
                                  prefault=True), shared=True)
    with tempfile.TemporaryDirectory(prefix="gpukv-holes-") as tmp:
        server = CacheServer(core, ServerConfig(address=f"ipc://{tmp}/gpukv.sock",
                                                limits=Limits(max_reserved_bytes=capacity)))
        loop = threading.Thread(target=server.serve_forever, daemon=True)
        loop.start()
        checks = {"off": HoleCheck(core.memories, enabled=False),
                  "on": HoleCheck(core.memories, enabled=True)}
        try:
            with CacheClient(server.address) as c:
                c.register("w", model, pages, dims, kind=m["kind"])
                assert c._locals["w"].chunk_bytes == chunk_bytes
                assert c.store("w", tokens, store_slots) == chunks * CHUNK
                assert c.lookup(model, tokens, request_id="r") == chunks * CHUNK
                handlers = server.sessions.handlers
                hashes = c._hashes(tokens, b"", None)
                sid = c.session

                def books():
                    from gpukv.frontend import protocol as p
                    plan = server.sessions.handle(sid, p.RetrieveBegin("w", "r", hashes))
                    assert plan["plan"], "a hole in a pre-faulted arena"
                    server.sessions.handle(sid, p.RetrieveEnd(plan["plan"]))

                def retrieve():
                    assert c.retrieve("w", tokens, read_slots, request_id="r") == chunks * CHUNK

                def top_up():
                    c.lookup(model, tokens, request_id="r")

                def store():
                    assert c.store("w", tokens, store_slots) == chunks * CHUNK

                def empty():
                    c.end_session("r")
                    assert core.l1.clear() == chunks

                rows = []
                for path, fn, before in (("books", books, top_up), ("retrieve", retrieve, top_up),
                                         ("store", store, empty)):
                    calls, setup = {}, {}
                    for name, check in checks.items():
                        def call(fn=fn, check=check):
                            handlers.holes = check
                            fn()
                        calls[name], setup[name] = call, before
                    times = time_alternating(calls, preset["repeats"], setup=setup, warmup=2)
                    off, on = spread(times["off"]), spread(times["on"])
                    rows.append(dict(model=model, chunks=chunks, chunk_bytes=chunk_bytes,
                                     path=path, off_min_us=off["min"] * 1e6,
                                     off_median_us=off["median"] * 1e6,
                                     off_max_us=off["max"] * 1e6, on_min_us=on["min"] * 1e6,
                                     on_median_us=on["median"] * 1e6, on_max_us=on["max"] * 1e6,
                                     ratio=on["median"] / off["median"],
                                     loadavg_1m=round(os.getloadavg()[0], 2)))
                base, offset = core.memories[0].tensor.data_ptr(), 0
                seeks = []
                for _ in range(7):
                    t0 = time.perf_counter()
                    for _ in range(preset["seeks"]):
                        has_hole(base, offset, chunk_bytes)
                    seeks.append((time.perf_counter() - t0) / preset["seeks"] * 1e9)
                rows.append(dict(model=model, chunks=1, chunk_bytes=chunk_bytes, path="mincore",
                                 off_min_us=float("nan"), off_median_us=float("nan"),
                                 off_max_us=float("nan"),
                                 on_min_us=min(seeks) / 1e3,
                                 on_median_us=statistics.median(seeks) / 1e3,
                                 on_max_us=max(seeks) / 1e3, ratio=float("nan"),
                                 loadavg_1m=round(os.getloadavg()[0], 2)))
                return rows
        finally:
            server.stop()
            loop.join(30)
            core.close(flush_timeout_s=5)
            for memory in core.memories:
                memory.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (fixed, printed)")
    args = parser.parse_args(argv)
    logging.getLogger("gpukv").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    info = run_info()
    print(f"{info['date']}, {info['machine']}, commit {info['commit']}, {info['threads']}, "
          f"load average {info['loadavg']} at start")
    preset = PRESETS[args.preset]
    rows = []
    points = [(model, chunks) for model in preset["models"] for chunks in preset["chunks"]]
    for model, chunks in progress(points, desc="hole check on/off"):
        rows += measure(model, chunks, preset)
    seen = set()
    rows = [r for r in rows if r["path"] != "mincore" or not (r["model"] in seen or seen.add(r["model"]))]
    out = results_dir("cpu")
    csv_path = write_csv(out / f"sweep_hole_check_{args.preset}.csv", rows)
    print(f"{'model':18} {'chunks':>6} {'chunk MB':>8} {'path':9} {'off us min/med/max':>24} "
          f"{'on us min/med/max':>24} {'on/off':>7}")
    for r in rows:
        print(f"{r['model']:18} {r['chunks']:6d} {r['chunk_bytes'] / 1e6:8.1f} {r['path']:9} "
              f"{r['off_min_us']:7.1f} {r['off_median_us']:7.1f} {r['off_max_us']:8.1f} "
              f"{r['on_min_us']:7.1f} {r['on_median_us']:7.1f} {r['on_max_us']:8.1f} "
              f"{r['ratio']:7.3f}")
    print(f"load average {os.getloadavg()[0]:.2f} at end; wrote {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
