"""Where the vLLM worker and EngineCore spend their time during the no-reuse benchmark, with and
without gpukv: py-spy samples of both processes, per thread and per gpukv frame.

The no-reuse comparison of :mod:`sweep_vllm_bench` (``--random-arms``) leaves a TPOT cost of gpukv
at equal thread binding that it cannot attribute. This samples the processes while the same
benchmark runs (its random dataset, the same engine and model; one worker OpenMP thread:
``VLLM_CPU_NUM_OF_RESERVED_CPU=1``, the binding vLLM picks without a connector on 2 cores) for the
arms ``n-null-connector`` (a connector that does nothing) and ``d-gpukv-async-stores`` (gpukv's
default), alternating, and prints per process: the samples of each thread, and the samples whose
innermost gpukv frame is where -- gpukv's share of each process's time (the null connector lives
in ``gpukv/testing``: its own hooks count as gpukv frames too).

Needs py-spy (``pip install py-spy``; not a gpukv dependency) and the right to trace the
engine's processes (same user).

    python perf/profile_vllm_worker.py [--repeats 1] [--seconds 15] [--gil] [--arms A,B]

Writes perf/results/cpu/profile_vllm_worker[_gil].csv (the log: redirect stdout). ``--gil``
samples only the threads holding the GIL: a gpukv thread's samples there are time the
forward's thread could not run Python.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import results_dir, run_header, run_info, write_csv  # noqa: E402
from sweep_vllm_bench import MODEL, RANDOM_ARMS, dataset_args  # noqa: E402
from vllm_openai import bench, openai_server  # noqa: E402

from gpukv.frontend.process import ServerProcess  # noqa: E402
from gpukv.testing.tiny_models import write_tiny_model  # noqa: E402

ARMS = ("n-null-connector", "d-gpukv-async-stores")
ROLES = {"worker": "VLLM::Worker", "engine": "VLLM::EngineCore"}


def samples(path: Path) -> tuple[int, collections.Counter, collections.Counter]:
    """(all samples, samples per thread name, samples per innermost gpukv frame) of a py-spy
    ``--format raw --threads`` file."""
    total, threads, frames = 0, collections.Counter(), collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        parts = stack.split(";")
        threads[parts[0].split(": ", 1)[-1].rstrip(")")] += n
        mine = [f for f in parts[1:] if "gpukv/" in f]
        if mine:
            frames[mine[-1].split(" (")[0]] += n
    return total, threads, frames


def profile(py_spy: str, model: Path, work: Path, arm: str, address: str, seed: int, seconds: int,
            gil: bool) -> list[dict]:
    prefix_caching, transfer = RANDOM_ARMS[arm]
    if transfer is not None and transfer["kv_connector"] == "GpukvConnector":
        transfer = dict(transfer, kv_connector_extra_config={**transfer["kv_connector_extra_config"],
                                                             "gpukv.address": address})
    with openai_server(model, work / f"{arm}-{seed}.server", prefix_caching=prefix_caching,
                       transfer=transfer, env={"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}) as server:
        procs = {role: next(p for p in psutil.Process(server.proc.pid).children(recursive=True) if p.name() == name)
                 for role, name in ROLES.items()}
        result: dict = {}
        client = threading.Thread(target=lambda: result.update(
            bench(server.port, model, dataset_args("random"), seed, work, f"{arm}-{seed}")))
        client.start()
        time.sleep(4)  # past the first prefills
        spies = {role: subprocess.Popen([py_spy, "record", "--pid", str(p.pid), "--duration", str(seconds),
                                         "--rate", "200", "--format", "raw", "--threads", "--nonblocking",
                                         *(["--gil"] if gil else []), "-o", str(work / f"{arm}-{seed}-{role}.txt")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
                 for role, p in procs.items()}
        for spy in spies.values():
            spy.wait()
        client.join()
    rows = []
    print(f"  {arm:22s} seed {seed}: TPOT p50 {result['median_tpot_ms']:.2f} ms", flush=True)
    for role in procs:
        total, threads, frames = samples(work / f"{arm}-{seed}-{role}.txt")
        gpukv = sum(frames.values())
        print(f"    {role}: {total} samples, {100 * gpukv / max(1, total):.1f} % in gpukv frames; threads "
              + ", ".join(f"{t} {n}" for t, n in threads.most_common(6)), flush=True)
        for frame, n in frames.most_common(8):
            print(f"      {n:5d} {frame}", flush=True)
        rows.append(dict(arm=arm, seed=seed, process=role, samples=total, gpukv_samples=gpukv,
                         main_thread=threads.get("MainThread", 0), tpot_median_ms=result["median_tpot_ms"],
                         top_gpukv_frames="; ".join(f"{f} {n}" for f, n in frames.most_common(4))))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--gil", action="store_true",
                        help="sample only the threads holding the GIL (py-spy --gil): how long each "
                             "thread keeps the others, the forward's thread included, from running Python")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma list of {ARMS}")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        sys.exit("py-spy not found: pip install py-spy")
    info = run_info()
    print(run_header(info), flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpukv-profile-") as tmp:
        work = Path(tmp)
        model = write_tiny_model("tiny-llama", work / "small-llama", tokenizer=True, **MODEL)
        address = f"ipc://{work}/gpukv.sock"
        with ServerProcess(address, chunk_size=256, capacity_bytes=2 << 30):
            for repeat in range(args.repeats):
                arms = args.arms.split(",")
                for arm in (arms if repeat % 2 == 0 else arms[::-1]):
                    rows += profile(py_spy, model, work, arm, address, 1000 + repeat, args.seconds, args.gil)
    name = "profile_vllm_worker_gil.csv" if args.gil else "profile_vllm_worker.csv"
    out = write_csv(results_dir("cpu") / name, [{**r, **info, "gil_only": args.gil} for r in rows])
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
