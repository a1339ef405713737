"""Shared-tier throughput: RemoteTier store and lookup+load through Redis on loopback, vs raw Redis.

For chunk values of real model shapes (DeepSeek-V3 MLA, Llama-3.1-8B) and 1..64 chunks per
request, in the same run against the same server:
  gpukv store    = RemoteTier.submit() x n + flush()      (encode + checksum + pipelined SET)
  raw store      = redis-py pipelined SET of the same payload bytes, same batch size
  gpukv load     = contains_many() + load_many()           (EXISTS + GET + decode + checks)
  raw load       = redis-py pipelined EXISTS + GET of the same bytes
  codec          = chunk_codec.encode / decode alone (no network): where the ratio goes
  engine store   = CacheEngine.store() + flush() with only a remote tier (pack + spill + SET)
  engine load    = lookup() + retrieve() after clear_l1() (remote -> temporary L1 -> pages)
  redis-benchmark (the CLI, -P batch -c 1, values <= 4 MiB only: its large-value path is
  pathological) as a second, client-independent reference.
GB/s counts payload bytes; ratio = gpukv GB/s / raw GB/s (what gpukv's framing and checks cost).
Starts its own redis-server on a free port unless --url is given.
"""

from __future__ import annotations

import argparse
import re
import statistics
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import MODELS, bench, progress, results_dir, write_csv  # noqa: E402

import redis  # noqa: E402

from gpukv import CacheEngine, EngineConfig  # noqa: E402
from gpukv.tiers import codec as chunk_codec  # noqa: E402
from gpukv.tiers.remote import RemoteTier  # noqa: E402

PRESETS = {
    "quick": dict(values=[("deepseek-v3-mla", 16)], chunks=[1, 8, 64], repeats=3),
    "full": dict(values=[("deepseek-v3-mla", 16), ("deepseek-v3-mla", 256),
                         ("llama3.1-8b", 256)],
                 chunks=[1, 2, 4, 8, 16, 32, 64], repeats=5),
}
BATCH_SIZE = 16
CLI_MAX_BYTES = 4 << 20
BLOCK_SIZE = 64  # vLLM MLA page block (the engine rows use MLA models only)


def chunk_bytes(model: str, chunk_size: int) -> int:
    spec = MODELS[model]
    num_kv = 1 if spec["kind"] == "mla" else 2
    row = spec["num_heads"] * spec["head_dim"] * spec["dtype"].itemsize
    return spec["num_layers"] * num_kv * chunk_size * row


def start_server(workdir: Path) -> tuple[subprocess.Popen, str]:
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server not on PATH (apt-get install redis-server) and no --url")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(workdir),
                             "--maxmemory", "8gb", "--maxmemory-policy", "allkeys-lru"],
                            stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    for _ in range(500):
        try:
            client.ping()
            return proc, url
        except redis.exceptions.ConnectionError:
            time.sleep(0.02)
    proc.kill()
    raise SystemExit("redis-server did not start")


def redis_benchmark(url: str, nbytes: int, repeats: int) -> dict:
    """SET/GET GB/s from the redis-benchmark CLI (single client, pipeline BATCH_SIZE)."""
    port = redis.Redis.from_url(url).connection_pool.connection_kwargs["port"]
    if shutil.which("redis-benchmark") is None or nbytes > CLI_MAX_BYTES:
        return dict(cli_set_gbps=float("nan"), cli_get_gbps=float("nan"))
    num_requests = max(64, min(2000, (512 << 20) // nbytes)) * repeats
    for attempt in (1, 2):  # the CLI fails now and then on a loaded machine (exit 1, no output)
        run = subprocess.run(["redis-benchmark", "-p", str(port), "-t", "set,get", "-n",
                              str(num_requests), "-d", str(nbytes), "-P", str(BATCH_SIZE), "-c", "1",
                              "--csv"], capture_output=True, text=True)
        rps = dict(re.findall(r'^"(SET|GET)","([\d.]+)"', run.stdout, re.M))
        if run.returncode == 0 and {"SET", "GET"} <= set(rps):
            break
        print(f"redis-benchmark failed (attempt {attempt}, exit {run.returncode}): "
              f"{(run.stderr or run.stdout).strip()[-200:]}", flush=True)
    else:
        return dict(cli_set_gbps=float("nan"), cli_get_gbps=float("nan"))
    return dict(cli_set_gbps=float(rps["SET"]) * nbytes / 1e9,
                cli_get_gbps=float(rps["GET"]) * nbytes / 1e9)


def engine_point(url: str, model: str, chunk_size: int, num_chunks: int, repeats: int) -> dict:
    """Median seconds of engine store+flush and lookup+retrieve through a remote-only engine."""
    spec = MODELS[model]
    if spec["kind"] != "mla":
        return dict(engine_store=float("nan"), engine_load=float("nan"))
    num_tokens = num_chunks * chunk_size
    num_blocks = -(-num_tokens // BLOCK_SIZE)
    pages = [torch.empty(num_blocks, BLOCK_SIZE, spec["head_dim"], dtype=spec["dtype"])
             for _ in range(spec["num_layers"])]
    for page in pages:
        page.view(torch.uint8).random_(0, 256)
    slots = torch.arange(num_tokens, dtype=torch.int64)
    token_ids = list(range(num_tokens))
    nbytes = num_chunks * chunk_bytes(model, chunk_size)
    raw = redis.Redis.from_url(url)
    eng = CacheEngine(EngineConfig(capacity_bytes=nbytes + (nbytes >> 2) + (64 << 20),
                                   device="cpu", chunk_size=chunk_size, remote_url=url,
                                   remote_timeout_s=30))
    eng.register("w0", model, pages, "NB,BS,D", kind="mla")
    store_s, load_s = [], []
    for rep in range(repeats + 1):  # rep 0 warms up
        raw.flushall()
        eng.clear_l1()
        start = time.perf_counter()
        assert eng.store("w0", token_ids, slots) == num_tokens
        assert eng.flush()
        store_s.append(time.perf_counter() - start)
        eng.clear_l1()
        start = time.perf_counter()
        assert eng.lookup(model, token_ids, request_id=rep) == num_tokens
        assert eng.retrieve("w0", token_ids, slots, request_id=rep) == num_tokens
        load_s.append(time.perf_counter() - start)
        eng.end_session(rep)
    remote = eng.stats()["tiers"]["remote"]
    eng.close()
    raw.flushall()
    assert remote["dropped"] == 0 and remote["corrupt"] == 0, remote
    return dict(engine_store=statistics.median(store_s[1:]),
                engine_load=statistics.median(load_s[1:]))


def run_point(url: str, value: tuple[str, int], num_chunks: int, repeats: int) -> dict:
    model, chunk_size = value
    nbytes = chunk_bytes(model, chunk_size)
    fp = f"{model}|cs{chunk_size}"
    gen = torch.Generator().manual_seed(num_chunks)
    payloads = [torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
                for _ in range(num_chunks)]
    keys = [f"{model}/0/{i:064x}" for i in range(num_chunks)]
    raw = redis.Redis.from_url(url)
    raw.flushall()
    tier = RemoteTier(url, namespace="bench", timeout_s=30, batch_size=BATCH_SIZE)

    def gpukv_store() -> None:
        for key, payload in zip(keys, payloads):
            assert tier.submit(key, fp, payload)
        assert tier.flush()

    def gpukv_load() -> None:
        assert all(tier.contains_many(keys))
        assert all(p is not None for p in tier.load_many(keys, fp, nbytes))

    raw_values = [p.numpy().tobytes() for p in payloads]
    raw_names = [f"raw:{key}" for key in keys]

    def raw_store() -> None:
        for start in range(0, num_chunks, BATCH_SIZE):
            pipe = raw.pipeline(transaction=False)
            for name, blob in zip(raw_names[start:start + BATCH_SIZE],
                                  raw_values[start:start + BATCH_SIZE]):
                pipe.set(name, blob)
            pipe.execute()

    def raw_load() -> None:
        pipe = raw.pipeline(transaction=False)
        for name in raw_names:
            pipe.exists(name)
        assert all(pipe.execute())
        pipe = raw.pipeline(transaction=False)
        for name in raw_names:
            pipe.get(name)
        assert all(v is not None for v in pipe.execute())

    blobs = [chunk_codec.encode(k, fp, p) for k, p in zip(keys, payloads)]
    t = dict(
        store=bench(gpukv_store, repeats=repeats, warmup=1),
        raw_store=bench(raw_store, repeats=repeats, warmup=1),
        load=bench(gpukv_load, repeats=repeats, warmup=1),
        raw_load=bench(raw_load, repeats=repeats, warmup=1),
        encode=bench(lambda: [chunk_codec.encode(k, fp, p) for k, p in zip(keys, payloads)],
                     repeats=repeats, warmup=1),
        decode=bench(lambda: [chunk_codec.decode(b, k, fp, nbytes) for b, k in zip(blobs, keys)],
                     repeats=repeats, warmup=1),
    )
    stats = tier.stats()
    tier.close()
    raw.flushall()
    assert stats["dropped"] == 0 and stats["corrupt"] == 0 and stats["errors"] == 0, stats
    del payloads, raw_values, blobs
    t |= engine_point(url, model, chunk_size, num_chunks, repeats)
    gb = num_chunks * nbytes / 1e9
    return dict(model=model, chunk_size=chunk_size, value_bytes=nbytes, chunks=num_chunks,
                store_gbps=gb / t["store"], raw_set_gbps=gb / t["raw_store"],
                store_ratio=t["raw_store"] / t["store"],
                load_gbps=gb / t["load"], raw_get_gbps=gb / t["raw_load"],
                load_ratio=t["raw_load"] / t["load"],
                encode_gbps=gb / t["encode"], decode_gbps=gb / t["decode"],
                engine_store_gbps=gb / t["engine_store"], engine_load_gbps=gb / t["engine_load"],
                store_ms=t["store"] * 1e3, load_ms=t["load"] * 1e3)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_gbps, ax_ratio) = plt.subplots(1, 2, figsize=(12, 4.5))
    for model, chunk_size in sorted({(r["model"], r["chunk_size"]) for r in rows}):
        sub = [r for r in rows if (r["model"], r["chunk_size"]) == (model, chunk_size)]
        label = f"{model} cs{chunk_size} ({sub[0]['value_bytes'] / 2**20:.1f} MiB)"
        x = [r["chunks"] for r in sub]
        line = ax_gbps.plot(x, [r["store_gbps"] for r in sub], "o-", label=f"{label} store")
        ax_gbps.plot(x, [r["raw_set_gbps"] for r in sub], "o:", color=line[0].get_color(),
                     label=f"{label} raw SET")
        line = ax_gbps.plot(x, [r["load_gbps"] for r in sub], "s-", label=f"{label} load")
        ax_gbps.plot(x, [r["raw_get_gbps"] for r in sub], "s:", color=line[0].get_color(),
                     label=f"{label} raw GET")
        ax_ratio.plot(x, [r["store_ratio"] for r in sub], "o-", label=f"{label} store / SET")
        ax_ratio.plot(x, [r["load_ratio"] for r in sub], "s--", label=f"{label} load / GET")
        ax_ratio.plot(x, [r["engine_store_gbps"] / r["raw_set_gbps"] for r in sub], "^-",
                      label=f"{label} engine store / SET")
        ax_ratio.plot(x, [r["engine_load_gbps"] / r["raw_get_gbps"] for r in sub], "v--",
                      label=f"{label} engine lookup+retrieve / GET")
    for ax in (ax_gbps, ax_ratio):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("chunks per request")
        ax.legend(fontsize=7)
    ax_gbps.set_ylabel("GB/s (payload)")
    ax_ratio.set_ylabel("gpukv GB/s / raw redis-py GB/s (same run)")
    ax_ratio.axhline(1.0, color="gray", lw=0.8, ls=":")
    fig.suptitle("gpukv shared tier through Redis on loopback (cpu)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--url", help="use this server instead of starting one (it is FLUSHALLed)")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    with tempfile.TemporaryDirectory() as workdir:
        proc, url = (None, args.url) if args.url else start_server(Path(workdir))
        try:
            cli = {v: redis_benchmark(url, chunk_bytes(*v), preset["repeats"])
                   for v in preset["values"]}
            points = [(v, n) for v in preset["values"] for n in preset["chunks"]]
            rows = [run_point(url, v, n, preset["repeats"]) | cli[v]
                    for v, n in progress(points, desc="sweep_remote")]
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait()
    out = results_dir("cpu")
    csv_path = write_csv(out / "sweep_remote.csv", rows)
    png_path = out / "sweep_remote.png"
    plot(rows, png_path)
    print(f"{'value':>24} {'n':>3} {'store':>6} {'rawSET':>6} {'ratio':>5} {'load':>6} "
          f"{'rawGET':>6} {'ratio':>5} {'enc':>6} {'dec':>6} {'engST':>6} {'engLD':>6} "
          f"{'cliSET':>6} {'cliGET':>6}  GB/s")
    for r in rows:
        print(f"{r['model'] + ' cs' + str(r['chunk_size']):>24} {r['chunks']:>3} "
              f"{r['store_gbps']:6.2f} {r['raw_set_gbps']:6.2f} {r['store_ratio']:5.2f} "
              f"{r['load_gbps']:6.2f} {r['raw_get_gbps']:6.2f} {r['load_ratio']:5.2f} "
              f"{r['encode_gbps']:6.2f} {r['decode_gbps']:6.2f} "
              f"{r['engine_store_gbps']:6.2f} {r['engine_load_gbps']:6.2f} "
              f"{r['cli_set_gbps']:6.2f} {r['cli_get_gbps']:6.2f}")
    print(f"wrote {csv_path}\nwrote {png_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
