"""perf/sweep_gpu_copy.py (the GPU sweep perf/gpu_check.sh runs) checked on a CPU: its ``--dry-run``
goes through every part (bandwidth with bit-exact verification, the matmul beside a copy, the
host transfers), the CSVs and the plot, at tiny shapes with the kernel interpreted, so a typo
does not cost the one GPU run a session gets. The numbers of a dry run mean nothing; the rows,
their columns and the verification do.
"""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "perf"))

if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the dry run is the CPU check of the GPU sweep (interpreted kernels)",
                allow_module_level=True)

import sweep_gpu_copy  # noqa: E402


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_dry_run_covers_every_part(tmp_path, capsys):
    layouts = ["mla-fp8ds-656", "llama8b-vllm-cpu", "llama8b-unaligned-8"]
    assert sweep_gpu_copy.main(["--dry-run", "--out", str(tmp_path), "--layouts", ",".join(layouts),
                                "--budgets", "1,all", "--repeats", "2"]) == 0
    rows = _rows(tmp_path / "sweep_gpu_copy.csv")
    assert len(rows) == len(layouts) * 2 * 2 * 2  # slots x op x budget
    assert {(r["layout"], r["slots"], r["op"], r["budget"]) for r in rows} == {
        (lay, s, op, b) for lay in layouts for s in ("blocks", "tokens") for op in ("pack", "unpack")
        for b in ("1", "all")}
    assert all(r["verified"] == "True" for r in rows)
    assert all(float(r["gbps"]) > 0 and float(r["ratio_vs_copy"]) > 0 for r in rows)
    assert {r["goal"] for r in rows if r["budget"] == "all"} == {"0.85", "0.7"}
    assert (tmp_path / "sweep_gpu_copy.png").stat().st_size > 0
    overlap = _rows(tmp_path / "sweep_gpu_copy_overlap.csv")
    assert [r["budget"] for r in overlap] == ["1", "all", "all"]
    assert overlap[-1]["aggressor"] == "copy_" and all(float(r["victim_s"]) > 0 for r in overlap)
    pcie = _rows(tmp_path / "sweep_gpu_copy_pcie.csv")
    assert [(r["direction"], r["chunks"]) for r in pcie] == [("d2h", "1"), ("h2d", "1"), ("d2h", "2"), ("h2d", "2")]
    assert "verified bit-exact: 24/24 points" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--layouts", "no-such-layout"], "unknown layout 'no-such-layout'"),
    (["--budgets", "8,0"], "a budget is a positive int or 'all', got '0'"),
    (["--parts", "bandwidth,speed"], "unknown part 'speed'"),
])
def test_bad_arguments_are_refused_before_any_work(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        sweep_gpu_copy.main(["--dry-run", "--out", str(tmp_path), *argv])
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_without_a_gpu_only_the_dry_run_runs(capsys):
    with pytest.raises(SystemExit):
        sweep_gpu_copy.main(["--parts", "pcie"])
    assert "no CUDA device: run with --dry-run" in capsys.readouterr().err


def test_gpu_check_script_parses_and_names_only_files_that_exist():
    import re
    import subprocess

    root = Path(__file__).resolve().parents[1]
    script = root / "perf" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    named = set(re.findall(r"\b((?:tests|perf)/[\w/]+\.py)\b", text))
    assert {"tests/test_kernels_sass.py", "tests/test_kernels_triton.py", "tests/test_frontend_cuda.py",
            "perf/sweep_gpu_copy.py", "perf/sweep_kernels.py"} <= named
    assert [n for n in sorted(named) if not (root / n).is_file()] == []
    limits = [int(s) for s in re.findall(r"^\S*\s*step (\d+) ", text, flags=re.M)]
    assert len(limits) == 4 and sum(limits) <= 600  # the whole check fits in 10 minutes
