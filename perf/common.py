"""Shared helpers for the perf sweeps: model table, timing, results folder, CSV and PNG."""

from __future__ import annotations

import csv
import functools
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

# Realistic per-rank shapes: (name, kind, num_layers, num_kv_heads, head_dim, dtype, row_bytes)
MODELS = {
    "llama3.1-8b": dict(kind="mha", num_layers=32, num_heads=8, head_dim=128, dtype=torch.bfloat16),
    "llama-70b-tp8": dict(kind="mha", num_layers=80, num_heads=1, head_dim=128, dtype=torch.bfloat16),
    "llama-70b-tp4": dict(kind="mha", num_layers=80, num_heads=2, head_dim=128, dtype=torch.bfloat16),
    "deepseek-v3-mla": dict(kind="mla", num_layers=61, num_heads=1, head_dim=576, dtype=torch.bfloat16),
    "deepseek-v3-fp8ds": dict(kind="mla", num_layers=61, num_heads=1, head_dim=656, dtype=torch.uint8),
}


def fill_random(t: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``t`` (contiguous) filled with one random MiB repeated: every page written (faulted in)
    before timing, at copy speed (``random_`` over the gigabytes of a DRAM-resident pool takes
    minutes); returns ``t``."""
    flat = t.view(torch.uint8).reshape(-1)
    gen = torch.Generator().manual_seed(seed)
    block = torch.randint(0, 256, (min(flat.numel(), 1 << 20),), dtype=torch.uint8, generator=gen)
    block = block.to(flat.device)
    whole = flat.numel() // block.numel()
    if whole:
        flat[:whole * block.numel()].view(whole, -1).copy_(block.expand(whole, -1))
    flat[whole * block.numel():] = block[:flat.numel() - whole * block.numel()]
    return t


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-")
    return "cpu"


def results_dir(device: torch.device | str, root: str | os.PathLike | None = None) -> Path:
    """``perf/results/<device>/`` (or ``$GPUKV_RESULTS_DIR/<device>``), created on demand."""
    base = Path(root or os.environ.get("GPUKV_RESULTS_DIR") or Path(__file__).parent / "results")
    path = base / device_name(device)
    path.mkdir(parents=True, exist_ok=True)
    return path


def bench(fn: Callable[[], object], *, device: torch.device | str = "cpu", repeats: int = 7,
          warmup: int = 2) -> float:
    """Median seconds of ``fn()``: CUDA events on a GPU, ``perf_counter`` on the CPU."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device | str, repeats: int,
                     warmup: int = 2) -> dict[str, list[float]]:
    """Seconds of every call of each function, timed in turn within every repeat (A B C A B C
    ...), so load on a shared machine slows them alike. CUDA events on a GPU."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    cuda = torch.device(device).type == "cuda"
    for _ in range(repeats):
        for name, fn in fns.items():
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return times


def time_alternating(calls: dict[str, Callable[[], object]], repeats: int, *,
                     setup: dict[str, Callable[[], object]] | None = None, warmup: int = 1,
                     device: torch.device | str = "cpu") -> dict[str, list[float]]:
    """Seconds of every call of each function, in turn within every repeat and in reverse order
    on odd repeats (A B C, C B A, ...), so a busy phase of a shared machine slows them alike.
    ``setup[name]()`` runs untimed before each call of ``name`` (e.g. clear the cache before a
    store). CUDA: the device is synchronized around each timed call."""
    setup = setup or {}
    cuda = torch.device(device).type == "cuda"
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + repeats):
        for name in names if r % 2 == 0 else reversed(names):
            if name in setup:
                setup[name]()
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            calls[name]()
            if cuda:
                torch.cuda.synchronize(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank (p99 of 200 samples: the 2nd largest)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run_info() -> dict[str, str]:
    """What a result needs beside it: date, machine, load average, commit, versions, threads."""
    import datetime
    import platform
    import subprocess

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True,
                                  text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"

    # (results a previous run left uncommitted are not changes to what is measured)
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ":/", ":(top,exclude)perf/results")
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                machine=f"{os.cpu_count()} CPUs ({cpu})",
                nproc=str(os.cpu_count()), loadavg=" ".join(f"{x:.2f}" for x in load_average()),
                commit=git("rev-parse", "--short", "HEAD")
                + (" (+ uncommitted changes)" if dirty not in ("", "unknown") else ""),
                python=platform.python_version(), torch=torch.__version__,
                threads=thread_settings())


def run_header(info: dict[str, str]) -> str:
    """The first line of a sweep's log: when, where, how loaded, which commit, which threads."""
    return f"{info['date']}, {info['machine']}, load {info['loadavg']}, commit {info['commit']}; {info['threads']}"


def thread_settings() -> str:
    """torch's thread count and the OpenMP / BLAS environment, as one printable line."""
    env = {k: os.environ.get(k, "unset") for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY",
                                                     "OPENBLAS_NUM_THREADS")}
    return f"torch threads {torch.get_num_threads()}, " + ", ".join(f"{k}={v}" for k, v in env.items())


def spread(times: list[float]) -> dict[str, float]:
    """min / median / max of a list of timings."""
    return dict(min=min(times), median=statistics.median(times), max=max(times))


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages (printed with results: the machine is shared)."""
    return tuple(round(x, 2) for x in os.getloadavg())


class ParallelCopy:
    """memcpy of a CPU tensor into another on ``threads`` threads by the mechanism gpukv's CPU
    copy path uses (:func:`gpukv.paged.copy_torch.run_shared`): numpy copies (which release the
    GIL) of a few slices per thread, taken in turn by the calling thread and a pool kept for the
    object's life. A baseline and the subject then share threads, pieces and scheduling."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.pool = ThreadPoolExecutor(threads - 1) if threads > 1 else None

    def __call__(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        from gpukv.paged.copy_torch import PIECES_PER_THREAD, run_shared

        d, s = dst.numpy().reshape(-1), src.numpy().reshape(-1)
        if self.pool is None:
            np.copyto(d, s)
            return
        n = PIECES_PER_THREAD * self.threads
        cuts = [len(d) * k // n for k in range(n + 1)]
        run_shared([functools.partial(np.copyto, d[a:b], s[a:b]) for a, b in zip(cuts, cuts[1:])],
                   self.pool, self.threads)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def write_csv(path: Path, rows: Iterable[dict]) -> Path:
    rows = list(rows)
    if not rows:
        raise ValueError(f"no rows to write to {path}")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def progress(iterable, **kwargs):
    """tqdm when installed (the perf extra), else the plain iterable."""
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, **kwargs)
