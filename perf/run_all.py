"""Run every perf sweep with one preset and write a Markdown summary per device.

    python perf/run_all.py --preset quick            # CPU: ~5 minutes on 2 cores
    python perf/run_all.py --preset full --device cuda
    python perf/run_all.py --only sweep_server       # one sweep; prints a partial summary

Each sweep writes its CSV and PNG into perf/results/<device>/ and its console output into
``<sweep>_<preset>.log`` there; this script then reads them back and writes summary.md with the
run's date, machine, load average and commit, and the headline ratios against baselines measured
in the same runs. A full run regenerates everything it summarises: result files it did not write
(an older run's, another preset's) are deleted. A sweep that fails is reported and makes the exit
code non-zero; the others still run. sweep_remote is skipped without redis-server. On a GPU only
the device-aware sweeps run (the others measure CPU paths: run them with --device cpu).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import load_average, results_dir, run_info  # noqa: E402
from summary import summarize  # noqa: E402

HERE = Path(__file__).parent
STEPS = {  # step name -> (script, extra arguments)
    "sweep_kernels": ("sweep_kernels", []),
    "sweep_copy_floor": ("sweep_copy_floor", []),
    "sweep_l1": ("sweep_l1", []),
    "sweep_l1_profile": ("sweep_l1", ["--profile"]),
    "sweep_engine": ("sweep_engine", []),
    "sweep_server": ("sweep_server", []),
    "sweep_metrics": ("sweep_metrics", []),
    "sweep_hole_check": ("sweep_hole_check", []),
    "sweep_ping_under_lookup": ("sweep_ping_under_lookup", []),
    "sweep_remote": ("sweep_remote", []),
    "sweep_ttft": ("sweep_ttft", []),
}
DEVICE_AWARE = {"sweep_kernels", "sweep_l1", "sweep_engine"}


def run_step(name: str, preset: str, device: str, out: Path) -> str:
    script, extra = STEPS[name]
    cmd = [sys.executable, str(HERE / f"{script}.py"), "--preset", preset, *extra]
    if script in DEVICE_AWARE:
        cmd += ["--device", device]
    log_path = out / f"{name}_{preset}.log"
    print(f"== {' '.join(cmd[1:])}  (load average {load_average()})", flush=True)
    t0 = time.perf_counter()
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONUNBUFFERED="1")  # logs without progress bars
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env)
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        code = proc.wait()
    took = time.perf_counter() - t0
    return f"ok ({took:.0f} s)" if code == 0 else f"FAILED (exit {code}, see {log_path.name})"


def remove_stale(out: Path, since: float, steps: list[str]) -> list[str]:
    """Delete the results of ``steps`` in ``out`` that this run did not write (a file a sweep no
    longer produces); returns their names. Files of sweeps run apart from run_all (sweep_vllm)
    are kept."""
    stale = [p for p in out.iterdir() if p.is_file() and p.name.startswith(tuple(steps))
             and p.stat().st_mtime < since]  # (summary.md is rewritten)
    for path in stale:
        path.unlink()
    return sorted(p.name for p in stale)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["quick", "full"], default="quick")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", nargs="*", default=None, help=f"a subset of {list(STEPS)}")
    args = parser.parse_args(argv)
    steps = args.only or [s for s in STEPS if args.device == "cpu" or STEPS[s][0] in DEVICE_AWARE]
    unknown = set(steps) - set(STEPS)
    if unknown:
        parser.error(f"unknown steps {sorted(unknown)}; choose from {list(STEPS)}")
    out = results_dir(args.device)
    info_before = run_info()
    started = time.time() - 1  # file times may be coarser than the clock
    status: dict[str, str] = {}
    for name in steps:
        if name == "sweep_remote" and shutil.which("redis-server") is None:
            status[name] = "skipped (no redis-server)"
            continue
        status[name] = run_step(name, args.preset, args.device, out)
    info = dict(info_before, loadavg_after=" ".join(f"{x:.2f}" for x in load_average()))
    gone = [] if args.only else remove_stale(out, started, steps)
    text = summarize(out, args.device, args.preset, status, info)
    if args.only:
        print(text)
        print("(--only: a partial summary, not written; nothing deleted)")
    else:
        summary = out / "summary.md"
        summary.write_text(text)
        print(text)
        print(f"wrote {summary}; removed {len(gone)} stale result files: {', '.join(gone) or 'none'}")
    return 0 if all(not s.startswith("FAILED") for s in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
