"""Printed tables and the PNG of :mod:`sweep_server` (rows as that sweep writes them)."""

from __future__ import annotations

from pathlib import Path


def print_tables(lookup: list[dict], metrics: list[dict], xfer: list[dict], first: list[dict]) -> None:
    if lookup:
        print(f"\nLOOKUP p50 µs (median of repeats; min..max of repeats' p50), p99 over all calls")
        print(f"{'tr':3} {'cl':>2} {'chunks':>6} {'echo p50':>9} {'gpukv p50 (min..max)':>24} "
              f"{'p99':>7} {'hashes':>7} {'emb':>7} {'x echo (min..max)':>18} {'goal':>4} "
              f"{'p99/p50':>7} {'load':>5}")
        for r in lookup:
            def f(key: str) -> str:
                return "" if r[key] == "" else f"{r[key]:.1f}"
            print(f"{r['transport']:3} {r['clients']:2d} {r['chunks']:6d} {r['echo_p50_us']:9.1f} "
                  f"{r['gpukv_p50_us']:8.1f} ({r['gpukv_p50_min_us']:6.1f}..{r['gpukv_p50_max_us']:6.1f}) "
                  f"{r['gpukv_p99_us']:7.1f} {f('hashes_p50_us'):>7} {f('embedded_p50_us'):>7} "
                  f"{r['ratio_vs_echo']:5.2f} ({r['ratio_vs_echo_min']:4.2f}..{r['ratio_vs_echo_max']:4.2f}) "
                  f"{r['goal_vs_echo']!s:>4} {r['p99_over_p50']:7.2f} {r['loadavg_1m']:5.2f}")
    prof = [r for r in lookup if r.get("handler_p50_us", "") != ""]
    if prof:
        print("\nwhere a LOOKUP goes (1 client; p50 µs): round trips of an echo, a PING and a LOOKUP "
              "with hashes given, in turn;\nin process: the client's token list -> int64 and all its "
              "hashing, the server's decode + handler + encode, the embedded lookup")
        print(f"{'tr':3} {'chunks':>6} {'echo':>7} {'ping':>7} {'lk hashes':>9} {'convert':>8} {'hash':>7} "
              f"{'handler':>8} {'embedded':>8} | {'LOOKUP':>7} {'echo':>7}")
        for r in prof:
            print(f"{r['transport']:3} {r['chunks']:6d} {r['echo_ctx_p50_us']:7.1f} {r['ping_p50_us']:7.1f} "
                  f"{r['hashes_p50_us']:9.1f} {r['convert_p50_us']:8.1f} {r['hash_p50_us']:7.1f} "
                  f"{r['handler_p50_us']:8.1f} {r['embedded_p50_us']:8.1f} | {r['gpukv_p50_us']:7.1f} "
                  f"{r['echo_p50_us']:7.1f}")
    if metrics:
        print(f"\nLOOKUP through the server, metrics off vs on (p50 µs, median of repeats)")
        for r in metrics:
            print(f"chunks {r['chunks']:4d}: off {r['off_p50_us']:7.1f} on {r['on_p50_us']:7.1f} "
                  f"on/off {r['ratio']:.3f} ({r['ratio_min']:.3f}..{r['ratio_max']:.3f}) goal <= "
                  f"{r['goal']} load {r['loadavg_1m']:.2f}")
    if xfer:
        print(f"\nSTORE / RETRIEVE, all workers at once (GB/s median, min..max over repeats)")
        for r in xfer:
            print(f"{r['op']:8} {r['workers']} workers {r['tokens']} tokens {r['mbytes_per_worker']:6.1f} "
                  f"MB each: server {r['server_gbps']:6.2f} ({r['server_gbps_min']:5.2f}..{r['server_gbps_max']:5.2f})"
                  f" embedded {r['embedded_gbps']:6.2f} ({r['embedded_gbps_min']:5.2f}..{r['embedded_gbps_max']:5.2f})"
                  f" ratio {r['ratio']:.2f} ({r['ratio_min']:.2f}..{r['ratio_max']:.2f}) goal >= {r['goal']}"
                  f" load {r['loadavg_1m']:.2f}")
    if first:
        print(f"\nFirst store into a fresh L1 vs a warm one (GB/s median, min..max)")
        for r in first:
            print(f"{r['path']:20} fresh {r['fresh_gbps']:6.2f} ({r['fresh_gbps_min']:5.2f}..{r['fresh_gbps_max']:5.2f})"
                  f" warm {r['warm_gbps']:6.2f} ({r['warm_gbps_min']:5.2f}..{r['warm_gbps_max']:5.2f})"
                  f" fresh/warm {r['ratio']:.2f} ({r['ratio_min']:.2f}..{r['ratio_max']:.2f}) goal >= "
                  f"{r['goal']}  [{r['mechanism']}]")


def plot(lookup: list[dict], metrics: list[dict], xfer: list[dict], first: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax = axes[0][0]
    for transport, marker in (("ipc", "o"), ("tcp", "s")):
        rows = [r for r in lookup if r["transport"] == transport and r["hashes_p50_us"] != ""]
        if not rows:
            continue
        x = [r["chunks"] for r in rows]
        for key, style, label in (("gpukv", "-", "gpukv"), ("echo", ":", "zmq echo"),
                                  ("hashes", "-.", "gpukv, hashes given"),
                                  ("embedded", "--", "embedded")):
            y = [r[f"{key}_p50_us"] for r in rows]
            if "" not in y:
                ax.plot(x, y, marker + style, label=f"{label} ({transport})", ms=4)
    ax.set(xscale="log", yscale="log", xlabel="chunks hit (256 tokens)", ylabel="p50 µs",
           title="LOOKUP, one client")
    ax.legend(fontsize=7)
    ax = axes[0][1]
    single = [r for r in lookup if r["hashes_p50_us"] != ""]
    series = [(f"1 client (this process), {t}", [r for r in single if r["transport"] == t])
              for t in dict.fromkeys(r["transport"] for r in single)]
    series += [(f"{n} client process(es), ipc", [r for r in lookup if r["hashes_p50_us"] == ""
                                                 and r["clients"] == n])
               for n in sorted({r["clients"] for r in lookup if r["hashes_p50_us"] == ""})]
    for label, rows in series:
        ax.errorbar([r["chunks"] for r in rows], [r["ratio_vs_echo"] for r in rows],
                    yerr=[[r["ratio_vs_echo"] - r["ratio_vs_echo_min"] for r in rows],
                          [r["ratio_vs_echo_max"] - r["ratio_vs_echo"] for r in rows]],
                    fmt="o-", capsize=3, label=label)
    for chunks, goal in ((32, 2.5), (128, 6.0)):
        ax.plot([chunks], [goal], "r_", ms=20, mew=2)
    ax.set(xscale="log", xlabel="chunks hit", ylabel="gpukv p50 / echo p50 (same repeat)",
           title="LOOKUP vs the bare zmq echo (red: goals)")
    ax.legend(fontsize=7)
    ax = axes[1][0]
    labels = [f"{r['op']}\n{r['workers']} w" for r in xfer]
    pos = list(range(len(xfer)))
    ax.bar([p - 0.2 for p in pos], [r["server_gbps"] for r in xfer], 0.4, label="server")
    ax.bar([p + 0.2 for p in pos], [r["embedded_gbps"] for r in xfer], 0.4, label="embedded")
    for p, r in zip(pos, xfer):
        ax.text(p, max(r["server_gbps"], r["embedded_gbps"]), f"{r['ratio']:.2f}x", ha="center",
                va="bottom", fontsize=7)
    ax.set_xticks(pos, labels, fontsize=7)
    ax.set(ylabel="GB/s, all workers", title=f"STORE / RETRIEVE of {xfer[0]['tokens'] if xfer else ''}"
           " tokens per worker (ratio server / embedded)")
    ax.legend(fontsize=7)
    ax = axes[1][1]
    names = [f"first store\n{r['path']}" for r in first] + [f"metrics\n{r['chunks']} chunks" for r in metrics]
    values = [r["ratio"] for r in first] + [r["ratio"] for r in metrics]
    lows = [r["ratio"] - r["ratio_min"] for r in first + metrics]
    highs = [r["ratio_max"] - r["ratio"] for r in first + metrics]
    ax.bar(range(len(values)), values, yerr=[lows, highs], capsize=3,
           color=["C2"] * len(first) + ["C4"] * len(metrics))
    ax.axhline(0.8, color="C2", ls=":", lw=1, label="first store goal >= 0.8 (fresh / warm)")
    ax.axhline(1.05, color="C4", ls=":", lw=1, label="metrics goal <= 1.05 (on / off)")
    ax.set_xticks(range(len(values)), names, fontsize=7)
    ax.set(ylabel="ratio (median, min..max)", title="first store; metrics cost end to end")
    ax.legend(fontsize=7)
    loads = [r["loadavg_1m"] for r in lookup + metrics + xfer + first]
    fig.suptitle(f"gpukv server (cpu), load average {min(loads):.1f}..{max(loads):.1f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
