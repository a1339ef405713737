"""The vLLM benchmark's plots (``perf/sweep_vllm_bench.py``): the prefix-repetition arms' TTFT
and throughput; the no-reuse arms' TPOT taken apart (decode steps, other requests' prefills
during a request's decode), TTFT and throughput."""

from __future__ import annotations

from pathlib import Path


def _axes(columns: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, columns, figsize=(6 * columns, 4.5))
    return plt, fig, axes


def _names(ax, rows: list[dict]) -> None:
    ax.set_xticks(range(len(rows)), [s["arm"] for s in rows], rotation=30, ha="right", fontsize=8)


def _bars(ax, rows: list[dict], key: str, ylabel: str, title: str) -> None:
    """One bar per arm of ``rows[i][key]``."""
    ax.bar(list(range(len(rows))), [s[key] for s in rows])
    _names(ax, rows)
    ax.set_ylabel(ylabel)
    ax.set_title(title)


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot(summary: list[dict], path: Path) -> None:
    prefix = [s for s in summary if s["dataset"] == "prefix"] or summary  # --only-random: those
    plt, fig, axes = _axes(2)
    x = range(len(prefix))
    axes[0].bar([i - 0.2 for i in x], [s["ttft_median_ms"] for s in prefix], width=0.4, label="TTFT p50")
    axes[0].bar([i + 0.2 for i in x], [s["ttft_p99_ms"] for s in prefix], width=0.4, label="TTFT p99")
    _names(axes[0], prefix)
    axes[0].set_ylabel("ms")
    axes[0].set_title("prefix_repetition: time to first token (median of runs)")
    axes[0].legend()
    _bars(axes[1], prefix, "req_per_s", "requests / s", "request throughput")
    _save(plt, fig, path)


def plot_random(summary: list[dict], path: Path) -> None:
    rows = [s for s in summary if s["dataset"] == "random"]
    plt, fig, axes = _axes(3)
    x = list(range(len(rows)))
    steady = [s["tpot_steady_ms"] for s in rows]
    axes[0].bar(x, steady, label="decode steps (mean gap)")
    axes[0].bar(x, [s["tpot_stall_ms"] for s in rows], bottom=steady, label="other requests' prefills")
    axes[0].scatter(x, [s["tpot_median_ms"] for s in rows], color="k", zorder=3, label="TPOT p50 (vLLM's)")
    _names(axes[0], rows)
    axes[0].set_ylabel("ms per output token")
    axes[0].set_title("no reuse: TPOT taken apart (median of runs)")
    axes[0].legend(fontsize=8)
    _bars(axes[1], rows, "ttft_median_ms", "ms", "TTFT p50")
    _bars(axes[2], rows, "req_per_s", "requests / s", "request throughput")
    _save(plt, fig, path)
