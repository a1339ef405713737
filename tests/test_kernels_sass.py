"""The copy kernel as a GPU would run it, checked on this CPU from its compiled SASS.

Every layout of perf/kernel_layouts.py (real model rows in every engine layout), pack and unpack,
is turned into the launch ``paged_copy`` makes at run time (``kernel_launch`` -> ``plan_copy``) and
compiled for sm_90a and sm_100a by perf/sass_table.py with the toolchain in the triton wheel, in
one child process per session (the kernels must not be interpreted there; identical
specializations compile once; Triton's disk cache makes later sessions fast). Asserted per
variant, from the cubin:

* it compiles, for the named target (the cubin's ``.target``), with no local memory and no
  STL/LDL (0 spills);
* no shared memory and no barrier: loaded registers go straight to the stores (a layout
  conversion between the loads and the stores would go through shared memory) and warps never
  wait for each other;
* registers <= 64: a 1024-thread CTA (the plan's ``NUM_WARPS = 32``) cannot launch with more
  (64 Ki registers per SM), and 64 leaves the SM's register file to one CTA of ours at most;
* aligned layouts: every global store is 128 bits, and there are as many 128-bit loads as stores
  (the data path is 16-byte vectors both ways; the only narrower loads are slots, the table
  entry and the chunk offset); the two ``unaligned`` rows move 8- and 2-byte words;
* no 64-bit division or remainder in the PTX and no CALL in the SASS (the slot's block and
  position come from shifts for power-of-two block sizes, a 32-bit division otherwise).

A missing toolchain binary skips these tests, or fails them with ``GPUKV_REQUIRE_CUDA_TOOLCHAIN=1``
(CI sets it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "perf"))
from kernel_layouts import LAYOUTS  # noqa: E402

MAX_REGISTERS = 64
ARCHS = ("sm_90a", "sm_100a")
NARROW = {"llama8b-unaligned-8": 64, "llama8b-unaligned-2": 16}  # expected store width, bits


def _missing(reason: str):
    if os.environ.get("GPUKV_REQUIRE_CUDA_TOOLCHAIN") == "1":
        pytest.fail(f"GPUKV_REQUIRE_CUDA_TOOLCHAIN=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def sass_rows() -> dict:
    """(layout, op, arch) -> the row perf/sass_table.py reports for it, compiled once per session."""
    try:
        import triton  # noqa: F401
    except ImportError:
        _missing("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(ROOT / "perf" / "sass_table.py"), "--json"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)
    if out.returncode == 3:
        _missing(out.stderr.strip())
    assert out.returncode == 0, out.stderr[-4000:]
    rows = json.loads(out.stdout)
    return {(r["layout"], r["op"], r["arch"]): r for r in rows}


VARIANTS = [(layout.name, op, arch) for layout in LAYOUTS for op in ("pack", "unpack") for arch in ARCHS]


def _counts(field: str) -> dict[str, int]:
    return {k: int(v) for k, v in (item.rsplit("x", 1) for item in field.split())}


def _bits(opcode: str) -> int:
    parts = opcode.split(".")
    for width, names in ((128, ("128",)), (64, ("64",)), (16, ("U16", "S16")), (8, ("U8", "S8"))):
        if any(p in names for p in parts[1:]):
            return width
    return 32


@pytest.mark.parametrize("layout, op, arch", VARIANTS)
def test_compiles_without_spills_within_the_register_bound(sass_rows, layout, op, arch):
    row = sass_rows[(layout, op, arch)]
    assert row["sass_target"] == arch, row
    assert row["local_bytes"] == 0 and row["spill_instructions"] == 0, row
    assert 0 < row["registers"] <= MAX_REGISTERS, row
    assert row["shared_bytes"] == 0 and row["barriers"] == 0, row  # loads feed stores directly


@pytest.mark.parametrize("layout, op, arch", VARIANTS)
def test_data_moves_in_16_byte_vectors_where_aligned(sass_rows, layout, op, arch):
    row = sass_rows[(layout, op, arch)]
    loads, stores = _counts(row["loads"]), _counts(row["stores"])
    store_bits = {_bits(op) for op in stores}
    wide_loads = sum(n for op, n in loads.items() if _bits(op) == 128)
    if layout in NARROW:
        assert store_bits == {NARROW[layout]} and wide_loads == 0, row
        return
    assert store_bits == {128}, row
    assert wide_loads == sum(stores.values()) > 0, row


@pytest.mark.parametrize("layout, op, arch", VARIANTS)
def test_no_64_bit_division(sass_rows, layout, op, arch):
    row = sass_rows[(layout, op, arch)]
    assert row["div64_in_ptx"] == 0 and row["calls"] == 0, row


def test_every_layout_of_the_table_was_compiled(sass_rows):
    assert set(sass_rows) == set(VARIANTS)
    assert {r["aligned"] for r in sass_rows.values()} == {True, False}


def test_a_missing_toolchain_fails_in_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setenv("GPUKV_REQUIRE_CUDA_TOOLCHAIN", "1")
    with pytest.raises(pytest.fail.Exception, match="GPUKV_REQUIRE_CUDA_TOOLCHAIN=1 but nvdisasm"):
        _missing("nvdisasm missing")
    monkeypatch.delenv("GPUKV_REQUIRE_CUDA_TOOLCHAIN")
    with pytest.raises(pytest.skip.Exception):
        _missing("nvdisasm missing")
