"""Sweep the L1 manager's host-side bookkeeping per key, against baselines measured in the same run.

Per batch of keys (1..4096) and share count S (1, 8, 128 shares per key; ``extra_count = S - 1``):

- ``read``: ``reserve_read(keys, S-1)`` + ``finish_read(keys, S-1)`` (the lookup/retrieve hot path).
- ``read_top_up``: the same with ``top_up=True`` (an idempotent lookup taking its first shares).
- ``pin_end_read`` (S-independent, shown at S=1): ``pin(keys)`` + ``end_read(handles)``, the
  retrieve's copy pin, releasing one share each (the owner's shares are refilled untimed).
- ``write``: ``reserve_write`` + ``finish_write`` of fresh keys, eviction off (the keys are deleted
  untimed after each sample) and on (the arena is full: every write evicts one LRU object).
- ``request``: the calls the engine makes for one request whose chunks are all in L1, on an MLA
  model whose S ranks share each object: ``reserve_prefix([keys], S-1)`` (the lookup), ``pin`` +
  ``end_read`` (one rank's retrieve), ``release_owner`` (the end of the request, which drops the
  other ranks' shares as an abort would).

Baselines, same run, same keys (tuples ``(model, rank, 16-byte hash)``, whose hash Python
recomputes at every dict operation, as it does for the subject):

- ``loop``: one call per share, the reference system's way: S ``reserve_read(keys, 0)`` then S
  ``finish_read(keys, 0)`` (batched over the keys, so kinder than one call per key and share).
- ``floor``: what any per-key bookkeeping costs at least: one locked pass doing one dict get and
  one set per key to take S shares, and one such pass to release them.

Method: every case of one (batch, S) cell is sampled once per repeat, in an order rotated each
repeat (subject and baselines alternate: ABAB...); a sample times ``inner`` back-to-back calls
(about 1 ms) with ``time.perf_counter`` (``--clock thread``: the thread's CPU time, which a
shared machine's other processes do not inflate) and is divided by ``inner * batch``. Reported: min /
median / max over the repeats; ratios are of medians. The garbage collector runs before each
sample, not inside it. torch's thread count is fixed (``--threads``, default 1) and printed with
the load average before and after. Goal (issue 15): ``read`` and ``read_top_up`` <= 0.25 µs per
key at every S and batch.

    python perf/sweep_l1.py --preset quick     # ~1 min on a small CPU
    python perf/sweep_l1.py --profile          # where the read path's time goes (knock-outs)

``--profile`` times the real ``reserve_read`` + ``finish_read`` against managers whose hold book
runs copies of its hot loops (``HoldBook.take`` and ``HoldBook.release``) compiled from their
own source with some statements replaced by ``pass`` (lease dict ops, the LRU touch, the status
appends; the results are then wrong, only the time matters), and against the two key lookups
every by-key call pays, in the same ABAB rounds.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import threading
import time
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import progress, results_dir, write_csv  # noqa: E402

from gpukv.l1 import MAX_READERS, L1Manager, Status  # noqa: E402
from gpukv.l1.slab import aligned_bytes  # noqa: E402

PRESETS = {
    "quick": dict(batches=[1, 16, 256, 4096], shares=[1, 8, 128], repeats=7),
    "full": dict(batches=[1, 4, 16, 64, 256, 1024, 4096], shares=[1, 8, 128], repeats=15),
}
OBJECT_BYTES = 4 << 10
SAMPLE_KEYS = 2048  # keys touched per sample (inner calls x batch), about 1 ms of work
GOAL_US = 0.25
OK = Status.OK
Sample = Callable[[], float]  # seconds per key of one sample
CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def make_keys(start: int, count: int) -> list[tuple]:
    """Realistic object keys: (model, kv_rank, 16-byte chunk hash)."""
    return [("deepseek-v3", 0, i.to_bytes(16, "little")) for i in range(start, start + count)]


def filled(batch: int, *, spare: int = 0, device: str = "cpu") -> tuple[L1Manager, list[tuple]]:
    """A manager holding ``batch`` ready objects, with room for ``spare`` more."""
    l1 = L1Manager((batch + spare) * aligned_bytes(OBJECT_BYTES), device=device)
    keys = make_keys(0, batch)
    assert l1.reserve_write(keys, OBJECT_BYTES) == [OK] * batch
    assert l1.finish_write(keys) == [OK] * batch
    return l1, keys


def timed(fn: Callable[[], object], inner: int, batch: int,
          clock: Callable[[], float] = time.perf_counter) -> float:
    gc.collect()
    t0 = clock()
    for _ in range(inner):
        fn()
    return (clock() - t0) / (inner * batch)


def read_cases(batch: int, shares: int, device: str,
               clock: Callable[[], float] = time.perf_counter) -> dict[str, Sample]:
    l1, keys = filled(batch, device=device)
    extra, inner = shares - 1, max(1, SAMPLE_KEYS // batch)
    reserve, finish = l1.reserve_read, l1.finish_read
    floor_lock, floor = threading.Lock(), {key: 0 for key in keys}

    def read() -> None:
        reserve(keys, extra, owner="req")
        finish(keys, extra, owner="req")

    def read_top_up() -> None:
        reserve(keys, extra, owner="req", top_up=True)
        finish(keys, extra, owner="req")

    def loop() -> None:
        for _ in range(shares):
            reserve(keys, 0, owner="req")
        for _ in range(shares):
            finish(keys, 0, owner="req")

    def floor_pass() -> None:
        get = floor.get
        with floor_lock:
            for key in keys:
                floor[key] = get(key, 0) + shares
        with floor_lock:
            for key in keys:
                floor[key] = get(key, 0) - shares

    def checked(fn: Callable[[], None]) -> Sample:
        def sample() -> float:
            seconds = timed(fn, inner, batch, clock)
            assert l1.stats()["shares"] == 0 and l1.stats()["leases"] == 0, fn.__name__
            return seconds
        return sample

    # the subject's statuses are checked once; the timed calls are the same calls
    assert reserve(keys, extra, owner="req", top_up=True) == [OK] * batch
    assert finish(keys, extra, owner="req") == [OK] * batch
    return {"read": checked(read), "read_top_up": checked(read_top_up), "loop": checked(loop),
            "floor": lambda: timed(floor_pass, inner, batch, clock)}


def pin_case(batch: int, device: str, clock: Callable[[], float] = time.perf_counter) -> Sample:
    l1, keys = filled(batch, device=device)
    inner = max(1, min(MAX_READERS, SAMPLE_KEYS // batch))
    pin, end_read = l1.pin, l1.end_read

    def retrieve() -> None:
        end_read(pin(keys)[1], owner="req")

    def sample() -> float:
        assert l1.reserve_read(keys, inner - 1, owner="req") == [OK] * batch  # untimed refill
        seconds = timed(retrieve, inner, batch, clock)
        assert l1.stats()["shares"] == 0 and l1.stats()["pinned"] == 0
        return seconds

    return sample


def request_case(batch: int, shares: int, device: str,
                 clock: Callable[[], float] = time.perf_counter) -> Sample:
    l1, keys = filled(batch, device=device)
    lists, extra, inner = [keys], shares - 1, max(1, SAMPLE_KEYS // batch)

    def request() -> None:
        l1.reserve_prefix(lists, extra, owner="req")
        l1.end_read(l1.pin(keys)[1], owner="req")
        l1.release_owner("req")

    def sample() -> float:
        seconds = timed(request, inner, batch, clock)
        assert l1.stats()["shares"] == 0 and l1.stats()["pinned"] == 0
        return seconds

    assert l1.reserve_prefix(lists, extra, owner="req") == batch  # the statuses, once, untimed
    assert l1.release_owner("req") == batch * shares
    return sample


def write_case(batch: int, evict: bool, device: str,
               clock: Callable[[], float] = time.perf_counter) -> Sample:
    l1, _ = filled(batch, spare=0 if evict else batch, device=device)
    if not evict:
        l1.clear()
    fresh = iter(range(1, 1 << 30))

    def sample() -> float:
        keys = make_keys(next(fresh) * batch, batch)
        gc.collect()
        t0 = clock()
        l1.reserve_write(keys, OBJECT_BYTES)
        l1.finish_write(keys)
        seconds = clock() - t0
        assert keys[-1] in l1 and l1.stats()["objects"] == batch
        if not evict:
            assert l1.delete(keys) == [OK] * batch
        return seconds / batch

    return sample


def sample_cell(cases: dict[str, Sample], repeats: int) -> dict[str, list[float]]:
    """ABAB...: each repeat samples every case once, the order rotated by one each repeat."""
    names = list(cases)
    times: dict[str, list[float]] = {name: [] for name in names}
    for case in cases.values():
        case()  # warm-up
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(cases[name]())
    return times


def run(preset: str, device: str, clock: Callable[[], float] = time.perf_counter) -> list[dict]:
    cfg = PRESETS[preset]
    rows = []

    def add(op: str, shares: int, batch: int, eviction: str, us: list[float]) -> None:
        rows.append(dict(op=op, eviction=eviction, extra_count=max(0, shares - 1), shares_per_key=shares,
                         batch=batch, us_per_key=statistics.median(us), us_min=min(us), us_max=max(us)))

    for batch in progress(cfg["batches"], desc="batch sizes"):
        for shares in cfg["shares"]:
            cases = read_cases(batch, shares, device, clock)
            cases["request"] = request_case(batch, shares, device, clock)
            if shares == 1:
                cases["pin_end_read"] = pin_case(batch, device, clock)
                cases["write"] = write_case(batch, False, device, clock)
                cases["write_evict"] = write_case(batch, True, device, clock)
            times = sample_cell(cases, cfg["repeats"])
            for name, seconds in times.items():
                op, evict = ("write", "on") if name == "write_evict" else (name, "off")
                add(op, shares if op not in ("write", "pin_end_read") else 1, batch, evict,
                    [s * 1e6 for s in seconds])
    by = {(r["op"], r["shares_per_key"], r["batch"], r["eviction"]): r for r in rows}
    for r in rows:
        base = (r["shares_per_key"], r["batch"], "off")
        r["vs_floor"] = r["us_per_key"] / by[("floor",) + base]["us_per_key"]
        if r["op"] in ("read", "read_top_up"):
            r["vs_extra0"] = r["us_per_key"] / by[(r["op"], 1, r["batch"], "off")]["us_per_key"]
            r["speedup_vs_loop"] = by[("loop",) + base]["us_per_key"] / r["us_per_key"]
    for r in rows:
        r.setdefault("vs_extra0", "")
        r.setdefault("speedup_vs_loop", "")
    return rows


# -- profile: what the hot path costs, by knocking statements out of its real source -------------
KNOCK_OUTS = {  # statements (exact text) of HoldBook.take / HoldBook.release replaced by ``pass``
    "lease dict ops": ["owned[entry] = deadline", "del owned[entry]"],
    "LRU touch": ["stamp += 1", "entry.stamp = stamp", "lru.move_to_end(entry)"],
    "status appends": ["out.append(OK)"],
}


def _knocked_out(statements: list[str]) -> type:
    """A HoldBook whose ``take`` and ``release`` are compiled from their source without
    ``statements`` (no slots of its own: an existing book's class can be swapped for it)."""
    import inspect
    import textwrap

    from gpukv.l1.holds import HoldBook  # (here: the sweep itself also runs on older trees)

    fns, found = {}, set()
    for fn in (HoldBook.take, HoldBook.release):
        lines = textwrap.dedent(inspect.getsource(fn)).splitlines()
        for i, line in enumerate(lines):
            if line.strip() in statements:
                found.add(line.strip())
                lines[i] = line[:len(line) - len(line.lstrip())] + "pass"
        namespace = dict(vars(sys.modules[fn.__module__]))
        exec("\n".join(lines), namespace)
        fns[fn.__name__] = namespace[fn.__name__]
    assert found == set(statements), f"not in the source any more: {set(statements) - found}"
    return type("KnockedOutHoldBook", (HoldBook,), dict(fns, __slots__=()))


def profile(batch: int, repeats: int, clock: Callable[[], float] = time.perf_counter) -> list[dict]:
    """ABAB over the real read path, the knocked-out variants and the baselines (one share)."""
    from gpukv.l1.holds import HoldBook

    variants = {"real": HoldBook}
    variants |= {f"without {name}": _knocked_out(stmts) for name, stmts in KNOCK_OUTS.items()}
    variants["without all three"] = _knocked_out([s for ss in KNOCK_OUTS.values() for s in ss])
    cases: dict[str, Sample] = {}
    for name, book_class in variants.items():
        l1, keys = filled(batch)
        l1._holds.__class__ = book_class  # the manager's (and its pool's) one hold book

        def run(l1=l1, keys=keys) -> None:
            l1.reserve_read(keys, 0, owner="req")
            l1.finish_read(keys, 0, owner="req")

        cases[name] = (lambda run=run: timed(run, max(1, SAMPLE_KEYS // batch), batch, clock))
    base = read_cases(batch, 1, "cpu", clock)
    l1, keys = filled(batch)
    get, lock, inner = l1._objects.get_ready, l1._lock, max(1, SAMPLE_KEYS // batch)

    def lookups() -> None:  # what any by-key call pays: the key lookups, under the lock
        for _ in range(2):
            with lock:
                for key in keys:
                    get(key)

    cases |= {"floor": base["floor"], "two key lookups": lambda: timed(lookups, inner, batch, clock)}
    times = sample_cell(cases, repeats)
    real = statistics.median(times["real"])
    return [dict(batch=batch, variant=name, ns_per_key=statistics.median(t) * 1e9,
                 ns_min=min(t) * 1e9, ns_max=max(t) * 1e9,
                 saves_ns=(real - statistics.median(t)) * 1e9) for name, t in times.items()]


def plot(rows: list[dict], path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5), sharey=True)
    shares = sorted({r["shares_per_key"] for r in rows if r["op"] == "read"})
    for ax, s in zip(axes, shares):
        for op, style in (("read", "-o"), ("read_top_up", "-s"), ("request", "-D"), ("loop", "--x"),
                          ("floor", ":.")) + (
                (("pin_end_read", "-^"), ("write", "-v")) if s == 1 else ()):
            pts = sorted((r["batch"], r["us_per_key"], r["us_min"], r["us_max"]) for r in rows
                         if r["op"] == op and r["shares_per_key"] == s and r["eviction"] == "off")
            if pts:
                x, med, lo, hi = zip(*pts)
                ax.errorbar(x, med, yerr=[[m - a for m, a in zip(med, lo)], [b - m for m, b in zip(med, hi)]],
                            fmt=style, capsize=2, label=op)
        ax.axhline(GOAL_US, color="red", lw=0.8, label=f"goal {GOAL_US} µs")
        ax.set_title(f"{s} share(s) per key (min / median / max)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("keys per call")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("µs per key")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--device", default="cpu", help="arena device: cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (fixed for the run)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall: time.perf_counter; thread: this thread's CPU time")
    parser.add_argument("--profile", action="store_true",
                        help="only the knock-out profile of reserve_read + finish_read (CSV)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    print(f"python {platform.python_version()}, torch {torch.__version__}, torch threads "
          f"{torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"cpus {os.cpu_count()}, clock {args.clock}, "
          f"load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")
    if args.profile:
        rows = [r for batch in (256, 4096)
                for r in profile(batch, PRESETS[args.preset]["repeats"], CLOCKS[args.clock])]
        csv_path = write_csv(results_dir("cpu") / f"sweep_l1_profile_{args.preset}.csv", rows)
        for r in rows:
            print(f"batch {r['batch']:>5} {r['variant']:>24}: {r['ns_min']:6.1f} {r['ns_per_key']:6.1f} "
                  f"{r['ns_max']:6.1f} ns/key (min median max); {r['saves_ns']:+6.1f} vs real")
        load = os.getloadavg()
        print(f"load average after {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\ncsv: {csv_path}")
        return
    rows = run(args.preset, args.device, CLOCKS[args.clock])
    load_after = os.getloadavg()
    out = results_dir(args.device)
    csv_path = write_csv(out / f"sweep_l1_{args.preset}.csv", rows)
    png_path = out / f"sweep_l1_{args.preset}.png"
    plot(rows, png_path)
    print(f"{'op':>12} {'S':>4} {'batch':>6} | µs/key min median max | x floor | x faster than loop")
    for r in rows:
        loop = r["speedup_vs_loop"]
        print(f"{r['op'] + ('+evict' if r['eviction'] == 'on' else ''):>12} {r['shares_per_key']:>4} "
              f"{r['batch']:>6} | {r['us_min']:7.3f} {r['us_per_key']:7.3f} {r['us_max']:7.3f} | "
              f"{r['vs_floor']:7.2f} | {'' if loop == '' else format(loop, '.1f')}")
    worst = {op: max(r["us_per_key"] for r in rows if r["op"] == op) for op in ("read", "read_top_up")}
    print("goal read+release <= %.2f µs/key at every S and batch: worst median read %.3f, top_up %.3f -> %s"
          % (GOAL_US, worst["read"], worst["read_top_up"],
             "met" if max(worst.values()) <= GOAL_US else "NOT met"))
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} {load_after[1]:.2f} "
          f"{load_after[2]:.2f}")
    print(f"csv: {csv_path}\npng: {png_path}")


if __name__ == "__main__":
    main()
