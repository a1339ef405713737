"""summary.md of one ``run_all`` run: its date, machine, load average and commit, then one table per
sweep, read back from the CSVs the sweeps wrote (ratios against baselines of the same runs)."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def _f(value, digits: int = 2) -> str:
    if value in ("", None) or value != value:  # (NaN: a median of nothing)
        return ""
    return f"{float(value):.{digits}f}"


def _med(values) -> float:
    values = [float(v) for v in values if v not in ("", None)]
    return statistics.median(values) if values else float("nan")


def _span(values, digits: int = 2) -> str:
    """median (min..max) of ``values``."""
    values = [float(v) for v in values if v not in ("", None)]
    if not values:
        return ""
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}..{max(values):.{digits}f})"


def _load(rows: list[dict]) -> str:
    loads = [float(r["loadavg_1m"]) for r in rows if r.get("loadavg_1m") not in ("", None)]
    return f"; load average {min(loads):.2f}..{max(loads):.2f} during it" if loads else ""


def _section(title: str, header: list[str], rows: list[tuple], note: str = "") -> list[str]:
    if not rows:
        return []
    lines = ["", f"## {title}", ""] + ([note, ""] if note else [])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]


def _kernels(out: Path, preset: str) -> list[str]:
    rows = _rows(out / f"sweep_kernels_{preset}.csv")
    table = []
    def key_of(r):
        return r.get("pool", "cache-resident"), r["model"], r["layout"], r["slots"], r["threads"], r["op"]

    for key in dict.fromkeys(key_of(r) for r in rows):
        sub = [r for r in rows if key_of(r) == key]
        table.append((*key, sub[0]["row_bytes"], _f(_med(r["gbps"] for r in sub)),
                      _span(r["ratio_vs_copy"] for r in sub), sub[0]["goal"],
                      _f(_med(r["ratio_vs_loop"] for r in sub)),
                      _f(_med(r.get("ratio_vs_numpy_path", "") for r in sub))))
    return _section(f"pack / unpack (`sweep_kernels_{preset}.csv`)",
                    ["pool", "model", "layout", "slots", "threads", "op", "row B", "GB/s",
                     "x memcpy, median (min..max) over chunk counts", "goal",
                     "x per-layer torch loop", "x numpy path (compiled gather off)"], table,
                    "memcpy of the same bytes on the same threads, timed in the same repeats; a "
                    "DRAM-resident pool spreads the calls over max(1 GiB, 8 x LLC) of pages and arena, "
                    "a cache-resident one reuses twice one call's pages (perf/pools.py)" + _load(rows) + ".")


def _copy_floor(out: Path, preset: str) -> list[str]:
    rows = _rows(out / f"sweep_copy_floor_{preset}.csv")
    return _section(f"what a gather in vLLM's order costs without gpukv (`sweep_copy_floor_{preset}.csv`)",
                    ["pool", "items", "row B", "item B", "layers", "memcpy GB/s", "gpukv", "numpy.take",
                     "C memcpy loop", "C + prefetch 8 ahead"],
                    [(r.get("pool", "cache-resident"), r["items"], r["row_bytes"], r["item_bytes"], r["layers"],
                      r["memcpy_gbs"],
                      *(f"{r[n]} ({r[n + '_span']})" if r[n] else "" for n in ("gpukv", "numpy", "c", "c_prefetch")))
                     for r in rows],
                    "x memcpy of the same bytes, same repeats, 1 thread, `NB,BS,D` pages of uint8 rows, 4 chunks of "
                    "256 tokens; the C loops are gpukv's compiled gather on one prepared batch (no planning)" +
                    _load([dict(loadavg_1m=r["load_avg"].split("..")[0]) for r in rows]) + ".")


def _l1(out: Path, preset: str) -> list[str]:
    rows = _rows(out / f"sweep_l1_{preset}.csv")
    table = []
    for op in ("read", "read_top_up", "pin_end_read", "write"):
        for shares in dict.fromkeys(r["shares_per_key"] for r in rows if r["op"] == op):
            sub = [r for r in rows if r["op"] == op and r["shares_per_key"] == shares and r["eviction"] == "off"]
            if sub:
                table.append((op, shares, _span((r["us_per_key"] for r in sub), 3),
                              _f(_med(r["vs_floor"] for r in sub)),
                              _f(_med(r["speedup_vs_loop"] for r in sub), 1)))
    lines = _section(f"L1 bookkeeping per key (`sweep_l1_{preset}.csv`, goal read <= 0.25 µs)",
                     ["op", "shares per key", "µs per key, median (min..max) over batch sizes",
                      "x floor (dict get+set)", "x per-share loop"], table)
    prof = _rows(out / f"sweep_l1_profile_{preset}.csv")
    return lines + _section(f"where reserve+finish read goes (`sweep_l1_profile_{preset}.csv`)",
                            ["batch", "variant", "ns per key", "saves ns"],
                            [(r["batch"], r["variant"], _f(r["ns_per_key"], 1), _f(r["saves_ns"], 1))
                             for r in prof])


def _engine(out: Path) -> list[str]:
    rows = _rows(out / "sweep_engine.csv")
    return _section("engine overhead (`sweep_engine.csv`, goal >= 0.8)",
                    ["kind", "tokens", "layers", "store GB/s", "store / pack (min..max)", "retrieve GB/s",
                     "retrieve / unpack (min..max)"],
                    [(r["kind"], r["tokens"], r["layers"], _f(r["store_gbps"]),
                      f"{_f(r['store_ratio'])} ({_f(r['store_ratio_min'])}..{_f(r['store_ratio_max'])})",
                      _f(r["retrieve_gbps"]),
                      f"{_f(r['retrieve_ratio'])} ({_f(r['retrieve_ratio_min'])}..{_f(r['retrieve_ratio_max'])})")
                     for r in rows], "raw copy time / engine time of the same repeat" + _load(rows) + ".")


def _server(out: Path) -> list[str]:
    lk = _rows(out / "sweep_server_lookup.csv")
    lines = _section("server LOOKUP (`sweep_server_lookup.csv`)",
                     ["transport", "clients", "chunks", "echo p50 µs", "gpukv p50 µs", "gpukv p99 µs",
                      "hashes given p50 µs", "embedded p50 µs", "gpukv / echo (min..max)", "goal", "p99 / p50"],
                     [(r["transport"], r["clients"], r["chunks"], _f(r["echo_p50_us"], 1),
                       _f(r["gpukv_p50_us"], 1), _f(r["gpukv_p99_us"], 1), _f(r["hashes_p50_us"], 1),
                       _f(r["embedded_p50_us"], 1),
                       f"{_f(r['ratio_vs_echo'])} ({_f(r['ratio_vs_echo_min'])}..{_f(r['ratio_vs_echo_max'])})",
                       r["goal_vs_echo"], _f(r["p99_over_p50"])) for r in lk],
                     "token ids in (the client hashes them); echo = a bare pyzmq ROUTER echoing a frame as "
                     "large as the LOOKUP request; calls alternate; p50 = median over repeats of each "
                     "repeat's p50" + _load(lk) + ".")
    prof = [r for r in lk if r.get("handler_p50_us", "") != ""]
    lines += _section("where a LOOKUP goes (`sweep_server_lookup.csv`, one client, p50 µs)",
                      ["transport", "chunks", "echo", "PING", "LOOKUP, hashes given", "client: tokens -> int64",
                       "client: all hashing", "server: decode + handler + encode", "embedded lookup",
                       "LOOKUP, token ids"],
                      [(r["transport"], r["chunks"], _f(r["echo_ctx_p50_us"], 1), _f(r["ping_p50_us"], 1),
                        _f(r["hashes_p50_us"], 1), _f(r["convert_p50_us"], 1), _f(r["hash_p50_us"], 1),
                        _f(r["handler_p50_us"], 1), _f(r["embedded_p50_us"], 1), _f(r["gpukv_p50_us"], 1))
                       for r in prof],
                      "the first four are round trips timed in turn; the client's and the server's parts "
                      "are timed in process on the same state (the LOOKUP ~ hashing + the round trip "
                      "with hashes given)")
    met = _rows(out / "sweep_server_metrics.csv")
    lines += _section("metrics cost end to end (`sweep_server_metrics.csv`, goal on / off <= 1.05)",
                      ["chunks", "metrics off p50 µs", "metrics on p50 µs", "on / off (min..max)"],
                      [(r["chunks"], _f(r["off_p50_us"], 1), _f(r["on_p50_us"], 1),
                        f"{_f(r['ratio'], 3)} ({_f(r['ratio_min'], 3)}..{_f(r['ratio_max'], 3)})") for r in met],
                      "LOOKUP through two servers alike but for EngineConfig(metrics=...)" + _load(met) + ".")
    xf = _rows(out / "sweep_server_transfer.csv")
    lines += _section("server STORE / RETRIEVE vs embedded (`sweep_server_transfer.csv`, goal >= 0.95)",
                      ["op", "workers", "tokens", "MB per worker", "server GB/s", "embedded GB/s",
                       "server / embedded (min..max)"],
                      [(r["op"], r["workers"], r["tokens"], _f(r["mbytes_per_worker"], 1), _f(r["server_gbps"]),
                        _f(r["embedded_gbps"]), f"{_f(r['ratio'])} ({_f(r['ratio_min'])}..{_f(r['ratio_max'])})")
                       for r in xf], "all workers at once, 1 torch thread each; GB/s of all of them" + _load(xf) + ".")
    fs = _rows(out / "sweep_server_first_store.csv")
    return lines + _section("first store into a fresh L1 vs a warm one (`sweep_server_first_store.csv`, goal >= 0.8)",
                            ["path", "fresh GB/s", "warm GB/s", "fresh / warm (min..max)", "arena memory"],
                            [(r["path"], _f(r["fresh_gbps"]), _f(r["warm_gbps"]),
                              f"{_f(r['ratio'])} ({_f(r['ratio_min'])}..{_f(r['ratio_max'])})", r["mechanism"])
                             for r in fs], "warm = the third store into the same L1, into the first one's slots"
                            + _load(fs) + ".")


def _metrics(out: Path) -> list[str]:
    rows = _rows(out / "sweep_metrics.csv")
    lines = _section("metrics cost in process (`sweep_metrics.csv`, goal on / off <= 1.05)",
                     ["handler", "chunks", "off µs (min..max)", "on µs (min..max)", "on / off", "+ µs"],
                     [(r["handler"], r["chunks"], f"{_f(r['off_median_us'])} ({_f(r['off_min_us'])}..{_f(r['off_max_us'])})",
                       f"{_f(r['on_median_us'])} ({_f(r['on_min_us'])}..{_f(r['on_max_us'])})",
                       _f(r["ratio"], 3), _f(r["overhead_us"])) for r in rows], _load(rows).lstrip("; "))
    calls = _rows(out / "sweep_metrics_calls.csv")
    return lines + _section("one metrics call (`sweep_metrics_calls.csv`)", ["call", "ns (min..max)"],
                            [(r["call"], f"{_f(r['median_ns'], 0)} ({_f(r['min_ns'], 0)}..{_f(r['max_ns'], 0)})")
                             for r in calls])


def _hole_check(out: Path, preset: str) -> list[str]:
    rows = _rows(out / f"sweep_hole_check_{preset}.csv")
    return _section(f"hole check of the shared arena (`sweep_hole_check_{preset}.csv`)",
                    ["model", "chunks", "path", "off µs (min..max)", "on µs (min..max)", "on / off"],
                    [(r["model"], r["chunks"], r["path"],
                      f"{_f(r['off_median_us'])} ({_f(r['off_min_us'])}..{_f(r['off_max_us'])})",
                      f"{_f(r['on_median_us'])} ({_f(r['on_min_us'])}..{_f(r['on_max_us'])})",
                      _f(r["ratio"], 3)) for r in rows],
                    "books = RETRIEVE_BEGIN + END handlers in process; retrieve / store = a whole "
                    "CacheClient call through a server; mincore = the check of one chunk alone"
                    + _load(rows) + ".")


def _ping(out: Path) -> list[str]:
    rows = _rows(out / "sweep_ping_under_lookup.csv")
    return _section("PING during a maximal LOOKUP (`sweep_ping_under_lookup.csv`, goal: worst <= 50 ms)",
                    ["repeat", "order", "lookup ms", "pings during it", "worst ping ms", "median ping ms",
                     "idle median ms", "median / idle"],
                    [(r["repeat"], r["order"], _f(r["lookup_ms"], 0), r["pings_during"], _f(r["worst_ping_ms"], 1),
                      _f(r["median_ping_ms"]), _f(r["idle_median_ms"]), _f(r["median_ratio"], 1)) for r in rows],
                    "131072 chunks x tp_size 128 looked up by one client while another pings back to back; "
                    "the baseline is the same client's ping to the idle server, blocks alternating"
                    + _load(rows) + ".")


def _remote(out: Path) -> list[str]:
    rows = _rows(out / "sweep_remote.csv")
    return _section("Redis tier vs raw redis-py (`sweep_remote.csv`)",
                    ["model", "chunks", "value MiB", "store / raw SET", "load / raw GET"],
                    [(r["model"], r["chunks"], f"{int(r['value_bytes']) / 2**20:.1f}", _f(r["store_ratio"]),
                      _f(r["load_ratio"])) for r in rows],
                    "(this sweep times gpukv and raw redis-py in separate blocks, not alternating)")


def _ttft(out: Path) -> list[str]:
    lines = []
    for path in sorted(out.glob("sweep_ttft_*.csv")):
        rows = _rows(path)
        lines += _section(f"time to first token (`{path.name}`)",
                          ["prompt", "shared", "TTFT full ms", "TTFT cached ms", "speedup (min..max)",
                           "round trip / ideal", "logits identical"],
                          [(r["prompt_tokens"], r["shared_frac"], r["ttft_full_ms"], r["ttft_cached_ms"],
                            f"{r['speedup']} ({r.get('speedup_min', '')}..{r.get('speedup_max', '')})",
                            r["roundtrip_frac_of_ideal"], r["logits_identical"]) for r in rows],
                          f"{rows[0]['repeats'] if rows else ''} serves a point, {rows[0]['threads'] if rows else ''} "
                          f"torch thread(s)" + _load(rows) + ".")
    return lines


def summarize(out: Path, device: str, preset: str, status: dict[str, str], info: dict[str, str]) -> str:
    lines = [f"# gpukv perf summary: {device} ({preset} preset)", "",
             f"- date: {info['date']}", f"- machine: {info['machine']}",
             f"- load average (1, 5, 15 min): {info['loadavg']} at the start, {info['loadavg_after']} at the end",
             f"- commit: {info['commit']}", f"- python {info['python']}, torch {info['torch']}",
             "- threads: each sweep fixes and prints its own (see its `.log`); 1 torch thread unless a "
             "column says otherwise, OMP_WAIT_POLICY=PASSIVE", "",
             "Ratios compare against a baseline measured in the same run, subject and baseline "
             "alternating; absolute numbers on a shared machine are noise.", "",
             "| sweep | status |", "|---|---|"]
    lines += [f"| {name} | {state} |" for name, state in status.items()]
    for part in (_kernels(out, preset), _copy_floor(out, preset), _l1(out, preset), _engine(out), _server(out), _metrics(out),
                 _hole_check(out, preset), _ping(out), _remote(out), _ttft(out)):
        lines += part
    return "\n".join(lines) + "\n"
