"""What gpukv's connector hooks cost a decode-only step (no chunk completes, nothing to copy),
with a healthy server: the product's scheduler and worker sides driven as in
``perf/sweep_vllm_steps.py`` (its simulated engine), ``REQUESTS`` requests decoding one token
per step. The baseline, the same loop without a connector, spends nothing in gpukv's hooks by
construction; this is the cost to compare with a decode step's TPOT.

    python perf/sweep_vllm_decode_hooks.py          # ~10 s

Writes perf/results/cpu/sweep_vllm_decode_hooks.csv (the log: redirect stdout).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import sweep_vllm_steps as steps  # noqa: E402
from common import quantile, results_dir, run_header, run_info, write_csv  # noqa: E402

from gpukv.frontend.process import ServerProcess  # noqa: E402
from gpukv.integrations.vllm.plan import RequestInfo, ScheduledRequest, StepView  # noqa: E402

REQUESTS, PROMPT, STEPS, FORWARD_S = 2, 1000, 400, 0.01


def run(engine: steps.Engine) -> list[float]:
    running = []
    for k in range(REQUESTS):  # admitted and prefilled once (a store each), then decode only
        info = RequestInfo(f"r{k}", [k * 100_000 + i + 1 for i in range(PROMPT)])
        while engine.planner.num_new_matched_tokens(info, 0) is None:
            engine.planner.build(StepView([]))
        blocks = [engine.free.pop() for _ in range(-(-(PROMPT + STEPS) // steps.BS))]
        engine.planner.after_alloc(info.request_id, 0, blocks)
        running.append((info.request_id, blocks))
    plan = engine.planner.build(StepView([ScheduledRequest(r, b, True, 0, PROMPT) for r, b in running]))
    worker = engine.worker
    worker.new_step(), worker.load(plan), worker.store(plan), worker.finished(plan)
    times = []
    for step in range(STEPS):
        t0 = time.perf_counter()
        plan = engine.planner.build(StepView([ScheduledRequest(r, None, False, PROMPT + step, 1)
                                              for r, _ in running]))
        worker.new_step(), worker.preempted(plan), worker.load(plan)
        for name in engine.pages:
            worker.wait_layer(name)
        worker.store(plan), worker.finished(plan), worker.take_failed_blocks()
        times.append(time.perf_counter() - t0)
        time.sleep(FORWARD_S)  # the forward
    return times


def main() -> None:
    torch.set_num_threads(1)
    info = run_info()
    print(run_header(info))
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpukv-decode-hooks-") as tmp:
        address = f"ipc://{tmp}/gpukv.sock"
        with ServerProcess(address, chunk_size=steps.CHUNK, capacity_bytes=256 << 20):
            for mode in steps.MODES:
                engine = steps.Engine(address, mode, timeout_s=10.0)
                try:
                    times = run(engine)
                finally:
                    engine.close()
                rows.append(dict(mode=mode, steps=len(times), requests=REQUESTS,
                                 p50_us=statistics.median(times) * 1e6,
                                 p99_us=quantile(times, 0.99) * 1e6, max_us=max(times) * 1e6, **info))
                print(f"{mode:8} decode step in gpukv's hooks: p50 {rows[-1]['p50_us']:.0f} us, "
                      f"p99 {rows[-1]['p99_us']:.0f} us, max {rows[-1]['max_us']:.0f} us")
    out = write_csv(results_dir("cpu") / "sweep_vllm_decode_hooks.csv", rows)
    print(f"baseline (no connector): 0 us in gpukv hooks by construction; wrote {out}")


if __name__ == "__main__":
    main()
