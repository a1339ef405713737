"""The time gpukv's connector adds to a vLLM engine step, with a healthy, a slow (every request /
reply turn delayed 100 ms) and a stopped (SIGSTOP) ``gpukv serve``.

A simulated engine drives the product's scheduler side (:class:`SchedulerPlanner`, its calls
thread and step budget) and worker side (:class:`WorkerSide`, its copy threads and wait budget)
through vLLM's hook order, one step at a time: a new 1024-token request arrives every step
(its first 512 tokens a prefix stored before, so each one looks up, loads 2 chunks and stores 2),
decodes 8 steps, finishes. The "forward" is a fixed sleep. Per step, the seconds spent inside
gpukv's hooks on each side (scheduler: lookup, alloc, build, finished, outputs; worker: preempt,
load, layer waits, store, finished) are summed; the baseline, the same loop without a
connector, spends none. Modes (loads / stores): ``sync`` sync / sync (the code before
asynchronous copies), ``default`` sync / async (the connector's default), ``async`` async / async.

    python perf/sweep_vllm_steps.py --preset quick     # ~5 minutes

Writes perf/results/cpu/sweep_vllm_steps_<preset>.csv and .png: per server condition and mode,
p50 / p99 / max ms per step, and the share of requests served from gpukv.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from common import load_average, quantile, results_dir, run_header, run_info, write_csv  # noqa: E402
from tcp_proxy import DelayProxy  # noqa: E402

from gpukv.frontend.client import CacheClient  # noqa: E402
from gpukv.frontend.process import ServerProcess  # noqa: E402
from gpukv.integrations.vllm.calls import ServerCalls  # noqa: E402
from gpukv.integrations.vllm.guard import GuardedClient  # noqa: E402
from gpukv.integrations.vllm.plan import RequestInfo, ScheduledRequest, StepView  # noqa: E402
from gpukv.integrations.vllm.planner import SchedulerPlanner  # noqa: E402
from gpukv.integrations.vllm.worker import WorkerSide  # noqa: E402

PRESETS = {"quick": dict(steps=150, forward_s=0.02), "full": dict(steps=400, forward_s=0.02)}
CHUNK, BS, LAYERS, H, D, NB = 256, 16, 8, 4, 64, 2048
PROMPT, SHARED, DECODE = 1024, 512, 8
MODEL, GROUP = "sweep-steps-model", "sweep-steps-engine-group-1"
MODES = {"sync": ("sync", "sync"), "default": ("sync", "async"), "async": ("async", "async")}


class Engine:
    """A scheduler side and a worker side on one server address, and a block allocator."""

    def __init__(self, address: str, mode: str, timeout_s: float) -> None:
        load_mode, store_mode = MODES[mode]
        self.pages = {f"layer.{i}": t for i, t in enumerate(torch.zeros(LAYERS, NB, H, BS, 2 * D,
                                                                         dtype=torch.bfloat16))}
        self.worker = WorkerSide(GuardedClient(CacheClient(address, group=GROUP, timeout_s=timeout_s,
                                                           ping_interval_s=0)),
                                 instance_id=f"w-{mode}-{os.getpid()}", model=MODEL, tp_rank=0, tp_size=1,
                                 block_size=BS, load_mode=load_mode, store_mode=store_mode)
        assert self.worker.register(self.pages, "CPU_ATTN")
        self.planner = SchedulerPlanner(
            GuardedClient(CacheClient(address, group=GROUP, timeout_s=timeout_s, ping_interval_s=0)),
            MODEL, tp_size=1, chunk_size=CHUNK, block_size=BS, loadable=True, lookup_wait_s=1.0,
            async_loads=load_mode == "async", async_stores=store_mode == "async", calls=ServerCalls(0.02))
        self.free = list(range(NB))

    def close(self) -> None:
        self.planner.close()
        self.worker.close()


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def run(engine: Engine, steps: int, forward_s: float, seed: int, on_step=None) -> dict:
    """``steps`` engine steps; per step the seconds in the scheduler's and the worker's hooks."""
    sched_s, work_s, hits, asked = [], [], 0, 0
    waiting: dict[str, RequestInfo] = {}
    running: dict[str, list] = {}  # rid -> [blocks, computed, decoded]
    loading: set[str] = set()
    finished: set[str] = set()
    prefix = list(range(seed * 10_000 + 1, seed * 10_000 + 1 + SHARED))
    worker, planner = engine.worker, engine.planner
    for step in range(steps):
        if on_step is not None:
            on_step(step)
        rid = f"r{seed}-{step}"
        waiting[rid] = RequestInfo(rid, prefix + [step * 1000 + i + 1 for i in range(PROMPT - SHARED)])
        s = 0.0
        new = []
        for rid, info in list(waiting.items()):
            ext, dt = _timed(planner.num_new_matched_tokens, info, 0)
            s += dt
            if ext is None:
                continue
            need = -(-(PROMPT + DECODE) // BS)
            if len(engine.free) < need:  # as vLLM: not admitted while its blocks are not free
                continue
            asked += 1
            hits += ext > 0
            blocks = [engine.free.pop() for _ in range(need)]
            _, dt = _timed(planner.after_alloc, rid, ext, blocks)
            s += dt
            del waiting[rid]
            if ext and planner.async_loads:
                loading.add(rid)
                running[rid] = [blocks, ext, -1]
            else:
                running[rid] = [blocks, ext, 0]
                new.append(ScheduledRequest(rid, blocks, True, ext, PROMPT - ext))
        cached = [ScheduledRequest(r, None, False, PROMPT + st[2] - 1, 1) for r, st in running.items()
                  if st[2] > 0]
        view = StepView(new + cached, finished=frozenset(finished))
        finished = set()
        plan, dt = _timed(planner.build, view)
        s += dt
        w = 0.0
        for hook in (worker.new_step, lambda: worker.preempted(plan), lambda: worker.load(plan)):
            w += _timed(hook)[1]
        time.sleep(forward_s)  # the forward (async loads start after it; stores read its KV)
        for name in engine.pages:
            w += _timed(worker.wait_layer, name)[1]
        w += _timed(worker.store, plan)[1]
        (sending, recving), dt = _timed(worker.finished, plan)
        w += dt + _timed(worker.take_failed_blocks)[1]
        s += _timed(planner.workers_done, sorted(sending))[1] + _timed(planner.loads_done, sorted(recving))[1]
        for r in recving:
            loading.discard(r)
            running[r][2] = 0
        for r in [r for r, st in running.items() if r not in loading]:
            running[r][2] += 1
            if running[r][2] > DECODE:
                delay, dt = _timed(planner.finished, r)
                s += dt
                engine.free.extend(running.pop(r)[0])  # (a fenced request's blocks, a step early: no reuse here)
                finished.add(r)
        sched_s.append(s)
        work_s.append(w)
    return dict(sched=sched_s, worker=work_s, hit_share=hits / max(asked, 1), requests=asked)


def _row(condition: str, mode: str, out: dict) -> dict:
    total = [a + b for a, b in zip(out["sched"], out["worker"])]
    return dict(condition=condition, mode=mode, steps=len(total), requests=out["requests"],
                hit_share=round(out["hit_share"], 3),
                p50_ms=statistics.median(total) * 1e3, p99_ms=quantile(total, 0.99) * 1e3,
                max_ms=max(total) * 1e3, sched_max_ms=max(out["sched"]) * 1e3,
                worker_max_ms=max(out["worker"]) * 1e3)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["p50_ms"] for r in rows], width=0.4, label="p50")
    ax.bar([i + 0.2 for i in x], [r["max_ms"] for r in rows], width=0.4, label="max")
    ax.axhline(50, color="red", linestyle="--", linewidth=1, label="goal: stopped <= 50 ms")
    ax.set_xticks(list(x), [f"{r['condition']}\n{r['mode']}" for r in rows])
    ax.set_ylabel("ms gpukv adds to a step")
    ax.set_title("vLLM connector: time inside gpukv's hooks per engine step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=PRESETS, default="quick")
    args = parser.parse_args()
    cfg = PRESETS[args.preset]
    torch.set_num_threads(1)
    info = run_info()
    print(run_header(info))
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpukv-sweep-steps-") as tmp:
        port = 25000 + os.getpid() % 20000
        address = f"tcp://127.0.0.1:{port}"
        with ServerProcess(address, chunk_size=CHUNK, capacity_bytes=256 << 20) as server:
            proxy = DelayProxy(port, delay_s=0.1)
            seeds = iter(range(1, 1000))
            for mode in MODES:  # healthy, then slow through the proxy (the same server)
                for condition, addr in (("healthy", address), ("slow-100ms", f"tcp://127.0.0.1:{proxy.port}")):
                    engine = Engine(addr, mode, timeout_s=10.0)
                    seed = next(seeds)
                    _store_prefix(engine, seed)
                    out = run(engine, cfg["steps"], cfg["forward_s"], seed)
                    rows.append(_row(condition, mode, out))
                    engine.close()
                    print(rows[-1])
            for mode in MODES:  # stopped for a stretch of steps in the middle
                engine = Engine(address, mode, timeout_s=10.0)
                seed = next(seeds)
                _store_prefix(engine, seed)
                stop_at, cont_at = cfg["steps"] // 5, cfg["steps"] * 4 // 5

                def toggle(step, pid=server.pid, stop_at=stop_at, cont_at=cont_at):
                    if step == stop_at:
                        os.kill(pid, signal.SIGSTOP)
                    elif step == cont_at:
                        os.kill(pid, signal.SIGCONT)

                try:
                    out = run(engine, cfg["steps"], cfg["forward_s"], seed, on_step=toggle)
                finally:
                    os.kill(server.pid, signal.SIGCONT)
                rows.append(_row("stopped", mode, out))
                engine.close()
                print(rows[-1])
            proxy.close()
    print(f"\n{'condition':11} {'mode':6} {'steps':>5} {'hits':>5} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7}"
          f" {'sched max':>9} {'worker max':>10}")
    for r in rows:
        print(f"{r['condition']:11} {r['mode']:6} {r['steps']:>5} {r['hit_share']:>5.2f} {r['p50_ms']:>7.2f} "
              f"{r['p99_ms']:>7.2f} {r['max_ms']:>7.2f} {r['sched_max_ms']:>9.2f} {r['worker_max_ms']:>10.2f}")
    print(f"baseline (no connector): 0 ms in gpukv hooks by construction; load now {load_average()}")
    out = results_dir("cpu") / f"sweep_vllm_steps_{args.preset}.csv"
    write_csv(out, [dict(r, **info) for r in rows])
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png').name}")


def _store_prefix(engine: Engine, seed: int) -> None:
    """The shared prefix of this run's prompts, stored through the same engine (a request that
    computes it), so later requests hit its 2 chunks."""
    prefix = list(range(seed * 10_000 + 1, seed * 10_000 + 1 + SHARED))
    info = RequestInfo(f"prefix-{seed}", prefix + [1])
    while engine.planner.num_new_matched_tokens(info, 0) is None:
        engine.planner.build(StepView([]))
    blocks = [engine.free.pop() for _ in range(SHARED // BS + 1)]
    engine.planner.after_alloc(info.request_id, 0, blocks)
    plan = engine.planner.build(StepView([ScheduledRequest(info.request_id, blocks, True, 0, SHARED + 1)]))
    engine.worker.new_step()
    engine.worker.load(plan)
    engine.worker.store(plan)
    assert engine.worker.transfers.drain(30)
    engine.planner.finished(info.request_id)
    engine.free.extend(blocks)


if __name__ == "__main__":
    main()
