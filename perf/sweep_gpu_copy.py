"""The copy kernel on a GPU: GB/s against a device-to-device copy of the same bytes, per layout
and SM budget; the slowdown of a matmul beside it; arena <-> pinned host against the PCIe rate.

Three parts, one CSV each under perf/results/<gpu>/ (``--out`` to change), a PNG of the first:

  sweep_gpu_copy.csv          every layout of perf/kernel_layouts.py x slots (``blocks``: whole
                              blocks in random order, as a vLLM block table gives them;
                              ``tokens``: random token slots) x pack / unpack x SM budget (8, 16,
                              32, all): the kernel and ``dst.copy_(src)`` of the same bytes, timed
                              in turn with L2 flushed before each call; ratio = copy time / kernel
                              time of the same repeat (median, quartiles beside it)
  sweep_gpu_copy_overlap.csv  a bf16 matmul on one stream, alone and while a pack (Llama-8B,
                              FlashInfer HND, whole blocks) runs back to back on another stream,
                              per budget, and while ``copy_`` does (every SM): its slowdown
  sweep_gpu_copy_pcie.csv     arena -> pinned host memory and back for 1 and 8 chunks, against a
                              1 GiB pinned copy each way (the measured PCIe rate)

Every layout is packed and unpacked once and compared bit-exact with the torch backend before
it is timed (``verified``). Goals (issue 20): ratio >= 0.85 for blocks and >= 0.7 for tokens at
budget "all"; matmul slowdown <= 10 % at the default budget (gpukv_kernels.paged_copy_plan).

  python perf/sweep_gpu_copy.py              # on a GPU
  python perf/sweep_gpu_copy.py --dry-run    # on a CPU: every code path at tiny shapes, the
                                             # kernel interpreted; the numbers mean nothing
"""

from __future__ import annotations

import os
import sys

if "--dry-run" in sys.argv:  # the interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import device_name, progress, results_dir, write_csv  # noqa: E402
from gpu_timing import Clock  # noqa: E402
from kernel_layouts import BY_NAME, LAYOUTS, build  # noqa: E402

from gpukv.paged.copy import pack, unpack  # noqa: E402
from gpukv.paged.copy_triton import copy_kernel  # noqa: E402
from gpukv.paged.layout import PagedKV  # noqa: E402
from gpukv.paged.planes import plane_views  # noqa: E402
from gpukv_kernels.paged_copy_plan import DEFAULT_SM_BUDGET  # noqa: E402

BUDGETS = [8, 16, 32, None]
GOALS = {"blocks": 0.85, "tokens": 0.7}
OVERLAP_GOAL = 0.10
OVERLAP_LAYOUT = "llama8b-flashinfer-hnd"
POOL = 2  # the cache holds POOL x the blocks a call touches
SIZES = {  # what a run moves: GPU vs --dry-run
    "gpu": dict(chunk_size=256, num_chunks=8, num_layers=None, matmul=8192, matmul_calls=10,
                pcie_chunks=(1, 8), pcie_reference=1 << 30),
    "dry": dict(chunk_size=16, num_chunks=2, num_layers=2, matmul=64, matmul_calls=2,
                pcie_chunks=(1, 2), pcie_reference=1 << 20),
}


def budget_name(budget: int | None) -> str:
    return "all" if budget is None else str(budget)


def parse_budget(text: str) -> int | None:
    if text == "all":
        return None
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"a budget is a positive int or 'all', got {text!r}")
    return value


def case(layout_name: str, size: dict, device: torch.device, seed: int = 0):
    """A cache of POOL x the blocks a call needs, an arena of ``num_chunks`` chunks and its
    offsets on the device, and both slot patterns."""
    layout = BY_NAME[layout_name]
    tokens = size["num_chunks"] * size["chunk_size"]
    num_blocks = POOL * -(-tokens // layout.block_size)
    layers, dims, kind = build(layout, num_blocks, device, num_layers=size["num_layers"])
    paged = PagedKV.from_tensors(layers, dims, kind=kind)
    chunk_bytes = paged.chunk_bytes(size["chunk_size"])
    arena = torch.empty(size["num_chunks"] * chunk_bytes, dtype=torch.uint8, device=device)
    offsets = torch.arange(size["num_chunks"], dtype=torch.int64, device=device) * chunk_bytes
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.randperm(num_blocks, generator=gen)[: -(-tokens // layout.block_size)]
    whole = (blocks[:, None] * layout.block_size + torch.arange(layout.block_size)).flatten()[:tokens]
    slots = {"blocks": whole.to(device),
             "tokens": torch.randperm(num_blocks * layout.block_size, generator=gen)[:tokens].to(device)}
    return layout, layers, paged, arena, offsets, slots


def verify(paged, slots, arena, offsets, chunk_size: int) -> bool:
    """The kernel's pack and unpack equal the torch backend's, every byte of the arena and of
    the pages (``slots`` may hold -1)."""
    views = plane_views(paged)
    saved = [v.clone() for v in views]
    want = torch.full_like(arena, 0x3C)  # -1 slots leave their rows as they were
    got = want.clone()
    pack(paged, slots, want, offsets.cpu(), chunk_size=chunk_size, backend="torch")
    copy_kernel(paged, slots, got, offsets, chunk_size=chunk_size, layers=None, pack=True)
    ok = torch.equal(got, want)
    source = torch.empty_like(arena).random_(0, 256)
    unpack(paged, slots, source, offsets.cpu(), chunk_size=chunk_size, backend="torch")
    want_pages = [v.clone() for v in views]
    for v, s in zip(views, saved):
        v.copy_(s)
    copy_kernel(paged, slots, source, offsets, chunk_size=chunk_size, layers=None, pack=False)
    ok = ok and all(torch.equal(v, w) for v, w in zip(views, want_pages))
    for v, s in zip(views, saved):
        v.copy_(s)
    return ok


def bandwidth(clock: Clock, layout_names: list[str], budgets: list, size: dict, repeats: int,
              out: Path) -> list[dict]:
    rows = []
    points = [(n, s, op, b) for n in layout_names for s in GOALS for op in ("pack", "unpack") for b in budgets]
    current = None
    for name, slots_kind, op, budget in progress(points, desc="copy kernel vs copy_"):
        if current is None or current[0].name != name:
            current = None  # free the previous layout's memory first
            if clock.cuda:
                torch.cuda.empty_cache()
            current = case(name, size, clock.device)
            layout, _, paged, arena, offsets, slots = current
            mixed = torch.where(torch.arange(slots["tokens"].numel(), device=clock.device) % 7 == 3,
                                -1, slots["tokens"])
            verified = verify(paged, mixed, arena, offsets, size["chunk_size"])
            src, dst = torch.empty_like(arena).random_(0, 256), torch.empty_like(arena)
        layout, _, paged, arena, offsets, slots = current
        s = slots[slots_kind]

        def kernel(s=s, op=op, budget=budget):
            copy_kernel(paged, s, arena, offsets, chunk_size=size["chunk_size"], layers=None,
                        pack=op == "pack", sm_budget=budget)
        t = clock.alternate({"copy": lambda: dst.copy_(src), "kernel": kernel}, repeats)
        ratios = [c / k for c, k in zip(t["copy"], t["kernel"])]
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else (ratios[0],) * 3
        nbytes = arena.numel()
        rows.append(dict(layout=name, model=layout.model, dims=layout.dims, engine=layout.engine,
                         row_bytes=paged.row_bytes, block_size=layout.block_size, slots=slots_kind,
                         op=op, budget=budget_name(budget), num_chunks=size["num_chunks"],
                         bytes=nbytes, seconds=statistics.median(t["kernel"]),
                         gbps=nbytes / statistics.median(t["kernel"]) / 1e9,
                         copy_gbps=nbytes / statistics.median(t["copy"]) / 1e9,
                         ratio_vs_copy=statistics.median(ratios), ratio_q1=q1, ratio_q3=q3,
                         goal=GOALS[slots_kind] if budget is None else "", verified=verified,
                         repeats=repeats, device=device_name(clock.device)))
        write_csv(out / "sweep_gpu_copy.csv", rows)  # a run cut short keeps what it measured
    return rows


def overlap(clock: Clock, budgets: list, size: dict, repeats: int) -> list[dict]:
    layout, _, paged, arena, offsets, slots = case(OVERLAP_LAYOUT, size, clock.device)
    n = size["matmul"]
    dtype = torch.bfloat16 if clock.cuda else torch.float32
    a = torch.randn(n, n, device=clock.device, dtype=dtype)
    b, c = torch.randn_like(a), torch.empty_like(a)
    src, dst = torch.empty_like(arena), torch.empty_like(arena)
    aggressors = {budget_name(bud): (lambda bud=bud: copy_kernel(
        paged, slots["blocks"], arena, offsets, chunk_size=size["chunk_size"], layers=None,
        pack=True, sm_budget=bud)) for bud in budgets}
    aggressors["copy_"] = lambda: dst.copy_(src)
    rows = []
    for name, fn in progress(list(aggressors.items()), desc="matmul beside a copy"):
        r = clock.slowdown(lambda: torch.matmul(a, b, out=c), fn, victim_calls=size["matmul_calls"],
                           repeats=repeats)
        rows.append(dict(aggressor="copy_" if name == "copy_" else f"pack {OVERLAP_LAYOUT}",
                         budget="all" if name == "copy_" else name, matmul=n,
                         matmul_calls=size["matmul_calls"], copy_bytes=arena.numel(), **r,
                         goal=OVERLAP_GOAL if name == budget_name(DEFAULT_SM_BUDGET) else "",
                         device=device_name(clock.device)))
    return rows


def pcie(clock: Clock, size: dict, repeats: int) -> list[dict]:
    """Arena chunks to pinned host memory and back, and a large pinned copy each way."""
    layout, _, paged, arena, offsets, slots = case(OVERLAP_LAYOUT, size, clock.device)
    chunk_bytes = paged.chunk_bytes(size["chunk_size"])
    pin = clock.cuda
    ref_n = size["pcie_reference"]
    ref_dev = torch.empty(ref_n, dtype=torch.uint8, device=clock.device)
    ref_host = torch.empty(ref_n, dtype=torch.uint8, pin_memory=pin)
    t_ref = clock.alternate({"d2h": lambda: ref_host.copy_(ref_dev, non_blocking=True),
                             "h2d": lambda: ref_dev.copy_(ref_host, non_blocking=True)}, repeats)
    rows = []
    for chunks in size["pcie_chunks"]:
        n = min(chunks, size["num_chunks"]) * chunk_bytes
        host = torch.empty(n, dtype=torch.uint8, pin_memory=pin)
        t = clock.alternate({"d2h": lambda: host.copy_(arena[:n], non_blocking=True),
                             "h2d": lambda: arena[:n].copy_(host, non_blocking=True)}, repeats)
        for direction in ("d2h", "h2d"):
            gbps = n / statistics.median(t[direction]) / 1e9
            ref = ref_n / statistics.median(t_ref[direction]) / 1e9
            rows.append(dict(direction=direction, layout=OVERLAP_LAYOUT, chunks=n // chunk_bytes,
                             bytes=n, gbps=gbps, reference_bytes=ref_n, reference_gbps=ref,
                             ratio_vs_reference=gbps / ref, pinned=pin, device=device_name(clock.device)))
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = list(dict.fromkeys(r["budget"] for r in rows))
    fig, axes = plt.subplots(2, 2, figsize=(13, 9), sharey=True, squeeze=False)
    for i, kind in enumerate(GOALS):
        for ax, op in zip(axes[i], ("pack", "unpack")):
            for name in dict.fromkeys(r["layout"] for r in rows):
                line = {r["budget"]: r["ratio_vs_copy"] for r in rows
                        if (r["layout"], r["slots"], r["op"]) == (name, kind, op)}
                ax.plot(range(len(budgets)), [line.get(b, float("nan")) for b in budgets], "o-",
                        label=name, lw=1)
            ax.axhline(GOALS[kind], color="gray", ls=":", lw=1)
            ax.set_xticks(range(len(budgets)), [f"{b} SMs" if b != "all" else "all" for b in budgets])
            ax.set_title(f"{op}, slots={kind} ({rows[0]['device']})")
        axes[i][0].set_ylabel("copy_ time / kernel time, same repeat (median)")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true",
                        help="on the CPU at tiny shapes, the kernel interpreted (checks the script)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default perf/results/<gpu>; a temporary one for --dry-run)")
    parser.add_argument("--layouts", type=lambda s: s.split(","), default=[lay.name for lay in LAYOUTS])
    parser.add_argument("--budgets", type=lambda s: [parse_budget(x) for x in s.split(",")],
                        default=BUDGETS, help="comma-separated SM budgets, 'all' = every SM")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per subject (11; dry run 2)")
    parser.add_argument("--parts", type=lambda s: s.split(","), default=["bandwidth", "overlap", "pcie"])
    args = parser.parse_args(argv)
    for name in args.layouts:
        if name not in BY_NAME:
            parser.error(f"unknown layout {name!r}; expected some of {sorted(BY_NAME)}")
    for part in args.parts:
        if part not in ("bandwidth", "overlap", "pcie"):
            parser.error(f"unknown part {part!r}; expected bandwidth, overlap, pcie")
    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("--dry-run needs TRITON_INTERPRET=1 before triton is imported")
        device, size, repeats = torch.device("cpu"), SIZES["dry"], args.repeats or 2
        out = args.out or Path(tempfile.mkdtemp(prefix="gpukv-sweep-gpu-dry-"))
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run with --dry-run to check the script on a CPU")
        device, size, repeats = torch.device("cuda"), SIZES["gpu"], args.repeats or 11
        out = args.out or results_dir(device)
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock(device)
    print(f"device {device_name(device)}; budgets {[budget_name(b) for b in args.budgets]}; "
          f"{size['num_chunks']} chunks of {size['chunk_size']} tokens per call; repeats {repeats}; "
          f"L2 flush {clock.scratch.numel() >> 20} MiB; torch threads {torch.get_num_threads()}; "
          f"default budget {DEFAULT_SM_BUDGET}")
    # the short parts first: a run cut short by gpu_check.sh's time limit keeps them, and the
    # bandwidth part writes its CSV after every point
    if "overlap" in args.parts:
        rows = overlap(clock, args.budgets, size, max(3, repeats // 3))
        write_csv(out / "sweep_gpu_copy_overlap.csv", rows)
        for r in rows:
            print(f"matmul {r['matmul']}^3 x{r['matmul_calls']} beside {r['aggressor']} budget "
                  f"{r['budget']:>4}: {r['victim_s'] * 1e3:8.2f} -> {r['victim_with_aggressor_s'] * 1e3:8.2f} ms "
                  f"(slowdown {r['slowdown']:+.1%}{', goal <= 10 %' if r['goal'] != '' else ''})")
    if "pcie" in args.parts:
        rows = pcie(clock, size, repeats)
        write_csv(out / "sweep_gpu_copy_pcie.csv", rows)
        for r in rows:
            print(f"{r['direction']} {r['chunks']} chunk(s), {r['bytes'] >> 20} MiB: {r['gbps']:6.1f} GB/s "
                  f"= {r['ratio_vs_reference']:.2f} x the {r['reference_bytes'] >> 20} MiB pinned copy "
                  f"({r['reference_gbps']:.1f} GB/s)")
    if "bandwidth" in args.parts:
        rows = bandwidth(clock, args.layouts, args.budgets, size, repeats, out)
        plot(rows, out / "sweep_gpu_copy.png")
        print(f"{'layout':30} {'slots':6} {'op':6} {'budget':>6} {'GB/s':>7} {'copy_':>7} "
              f"{'x copy_':>7} {'(q1..q3)':>11} ok")
        for r in rows:
            print(f"{r['layout']:30} {r['slots']:6} {r['op']:6} {r['budget']:>6} {r['gbps']:7.1f} "
                  f"{r['copy_gbps']:7.1f} {r['ratio_vs_copy']:7.2f} ({r['ratio_q1']:.2f}..{r['ratio_q3']:.2f}) "
                  f"{'yes' if r['verified'] else 'NO'}")
        for kind, goal in GOALS.items():
            at_all = [r for r in rows if r["slots"] == kind and r["budget"] == "all"]
            met = sum(r["ratio_vs_copy"] >= goal for r in at_all)
            print(f"slots={kind}: {met}/{len(at_all)} points at budget 'all' reach the goal {goal}")
        print(f"verified bit-exact: {sum(r['verified'] for r in rows)}/{len(rows)} points")
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
