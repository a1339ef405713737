"""Registers, spills and access widths of every copy-kernel variant gpukv launches, from the cubin.

No GPU needed: each layout of perf/kernel_layouts.py is described by ``PagedKV`` (small CPU
tensors of the real row shapes), turned into the exact launch ``paged_copy`` makes
(``gpukv_kernels.paged_copy.kernel_launch``, which calls the run-time ``plan_copy``), and
compiled for sm_90a and sm_100a with the toolchain in the triton wheel
(``gpukv_kernels.cubin``). Variants that specialize identically compile once.

  .venv/bin/python perf/sass_table.py                  # -> perf/results/sass/paged_copy.csv
  .venv/bin/python perf/sass_table.py --before 9441cf9 # the kernel as of a commit, same layouts
  .venv/bin/python perf/sass_table.py --json           # rows as JSON on stdout (the CI test)

``--before`` loads ``gpukv_kernels/paged_copy.py`` from that commit (the launcher of the time,
keyword arguments as the adapter passed them then) and records the launch it makes.
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not the interpreter
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default, stated (no warning)

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import write_csv  # noqa: E402
from kernel_layouts import LAYOUTS, Layout, build  # noqa: E402

from gpukv.paged.copy_triton import address_table, kernel_args  # noqa: E402
from gpukv.paged.layout import PagedKV  # noqa: E402
from gpukv_kernels import paged_copy as kernel_module  # noqa: E402
from gpukv_kernels.cubin import (TARGETS, compile_spec, inspect_cubin, missing_tools,  # noqa: E402
                                 specialization_key, specialize)

CHUNK = 256
SM_COUNT = 132  # only sizes the grid, which the compiled code does not depend on
OUT = Path(__file__).resolve().parent / "results" / "sass"


def launch_args(layout: Layout, pack: bool):
    """(table, slots, offsets, arena, kwargs) of one chunk of ``layout`` through the adapter."""
    layers, dims, kind = build(layout, num_blocks=CHUNK // layout.block_size + 1, random=False)
    paged = PagedKV.from_tensors(layers, dims, kind=kind)
    arena = torch.zeros(paged.chunk_bytes(CHUNK), dtype=torch.uint8)
    slots = torch.arange(CHUNK, dtype=torch.int64)
    offsets = torch.zeros(1, dtype=torch.int64)
    return (address_table(paged), slots, offsets, arena,
            dict(kernel_args(paged, arena, CHUNK, None), pack=pack)), (layers, paged)


def current_launch(layout: Layout, pack: bool):
    (table, slots, offsets, arena, kw), keep = launch_args(layout, pack)
    launch = kernel_module.kernel_launch(table, slots, offsets, arena, sm_budget=None,
                                         sm_count=SM_COUNT, **kw)
    return kernel_module.paged_copy_kernel, launch.args, launch.kwargs, keep


def before_launch(module, layout: Layout, pack: bool):
    """The launch the old launcher makes: its kernel object is swapped for a recorder."""
    (table, slots, offsets, arena, kw), keep = launch_args(layout, pack)
    kw["word_bytes"] = min(kw["word_bytes"], 8)  # the old kernel moved words of at most 8 bytes
    seen = []
    real = module.paged_copy_kernel

    class Recorder:
        def __getitem__(self, grid):
            return lambda *a, **k: seen.append((a, k))

    module.paged_copy_kernel, module.InterpretedFunction = Recorder(), Recorder
    try:
        module.paged_copy(table, slots, offsets, arena, **kw)
    finally:
        module.paged_copy_kernel = real
    (args, kwargs), = seen
    return real, args, kwargs, keep


def load_before(commit: str, folder: Path):
    source = subprocess.run(["git", "show", f"{commit}:gpukv_kernels/paged_copy.py"],
                            cwd=Path(__file__).parent, capture_output=True, text=True, check=True).stdout
    path = folder / f"paged_copy_{commit}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # triton.jit reads the module's source through inspect
    spec.loader.exec_module(module)
    return module


def table(layouts: list[Layout], archs: list[str], before: str | None = None) -> list[dict]:
    """One row per layout, op and arch: the variant's constexprs and its cubin's figures."""
    with tempfile.TemporaryDirectory(prefix="gpukv-sass-before-") as folder:
        module = load_before(before, Path(folder)) if before else None
        return _rows(layouts, archs, before, module)


def _rows(layouts: list[Layout], archs: list[str], before: str | None, module) -> list[dict]:
    compiled: dict = {}
    rows = []
    for layout in layouts:
        for pack in (True, False):
            fn, args, kwargs, keep = (before_launch(module, layout, pack) if module
                                      else current_launch(layout, pack))
            for arch in archs:
                spec = specialize(fn, args, kwargs, TARGETS[arch])
                key = (arch, specialization_key(spec))
                if key not in compiled:
                    compiled[key] = inspect_cubin(compile_spec(fn, spec, TARGETS[arch]))
                report = compiled[key]
                consts = {k: (str(v).replace("triton.language.", "") if not isinstance(v, (int, bool))
                              else v) for k, v in kwargs.items()}
                rows.append(dict(kernel=f"before {before}" if before else "current",
                                 layout=layout.name, aligned=layout.aligned,
                                 op="pack" if pack else "unpack", arch=arch,
                                 variant=" ".join(f"{k}={v}" for k, v in consts.items()),
                                 **report.row()))
            del keep
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", metavar="COMMIT", help="the kernel as of COMMIT instead")
    parser.add_argument("--json", action="store_true", help="print rows as JSON, write no CSV")
    parser.add_argument("--archs", default=",".join(TARGETS), help=f"of {sorted(TARGETS)}")
    parser.add_argument("--layouts", default=None, help="comma-separated names (default: all)")
    args = parser.parse_args(argv)
    missing = missing_tools()
    if missing:
        print(f"sass_table: the triton wheel lacks {', '.join(missing)}", file=sys.stderr)
        return 3
    archs = args.archs.split(",")
    for arch in archs:
        if arch not in TARGETS:
            parser.error(f"unknown arch {arch!r}; expected some of {sorted(TARGETS)}")
    names = args.layouts.split(",") if args.layouts else [lay.name for lay in LAYOUTS]
    by_name = {lay.name: lay for lay in LAYOUTS}
    for name in names:
        if name not in by_name:
            parser.error(f"unknown layout {name!r}; expected some of {sorted(by_name)}")
    rows = table([by_name[n] for n in names], archs, args.before)
    if args.json:
        print(json.dumps(rows))
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    path = write_csv(OUT / (f"paged_copy_before_{args.before}.csv" if args.before else "paged_copy.csv"), rows)
    print(f"{'layout':30} {'op':6} {'arch':7} {'regs':>4} {'local':>5} {'instr':>5}  global loads | stores")
    for r in rows:
        print(f"{r['layout']:30} {r['op']:6} {r['arch']:7} {r['registers']:4d} {r['local_bytes']:5d} "
              f"{r['instructions']:5d}  {r['loads']} | {r['stores']}")
    print(f"wrote {path.relative_to(Path(__file__).resolve().parents[1])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
