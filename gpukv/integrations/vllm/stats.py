"""The connector's stats for vLLM's metrics: per worker, what its loads and stores moved (bytes),
how long each took and which failed; per scheduler, the tokens its external hits took from each
gpukv source (``gpu``, ``cpu``, ``disk``, ``remote``: :mod:`.tier_hits`). Nothing here imports
vLLM: :mod:`.prom` wraps the data for vLLM's stats path and ``/metrics``.

The worker side calls :meth:`TransferRecorder.record` around each load and store (``bytes``: what
the copy wrote into vLLM's pages or into gpukv; ``seconds``: wall time, server calls included;
``ok``); vLLM takes the stats once per engine step (``get_kv_connector_stats``:
:meth:`TransferRecorder.take`) and sums every worker's and the scheduler's (:func:`merge`).

The data is plain (vLLM sends it between processes)::

    {"load":  {"ops": int, "bytes": int, "failures": int, "seconds": [float, ...]},
     "store": {...same...},
     "hit_tokens": {source: int}}

``seconds`` keeps at most ``MAX_SAMPLES`` durations per op and interval (counts and bytes keep
everything).
"""

from __future__ import annotations

import threading
from typing import Any, Mapping

OPS = ("load", "store")
MAX_SAMPLES = 1024


def empty() -> dict[str, Any]:
    return {**{op: {"ops": 0, "bytes": 0, "failures": 0, "seconds": []} for op in OPS},
            "hit_tokens": {}}


def is_empty(data: Mapping[str, Any]) -> bool:
    return not any(data[op]["ops"] for op in OPS) and not any(data["hit_tokens"].values())


def merge(into: dict[str, Any], other: Mapping[str, Any]) -> dict[str, Any]:
    """Add ``other`` into ``into`` (returned)."""
    for op in OPS:
        a, b = into[op], other[op]
        for name in ("ops", "bytes", "failures"):
            a[name] += b[name]
        a["seconds"].extend(b["seconds"][:max(0, MAX_SAMPLES - len(a["seconds"]))])
    for source, tokens in other["hit_tokens"].items():
        into["hit_tokens"][source] = into["hit_tokens"].get(source, 0) + tokens
    return into


def reduce(data: Mapping[str, Any]) -> dict[str, int | float]:
    """One interval in a few numbers (vLLM's "KV Transfer metrics" log line)."""
    out: dict[str, int | float] = {}
    for op in OPS:
        d = data[op]
        seconds = d["seconds"]
        out[f"{op}_ops"] = d["ops"]
        out[f"{op}_failures"] = d["failures"]
        out[f"{op}_MB"] = round(d["bytes"] / 1e6, 3)
        out[f"{op}_avg_ms"] = round(1e3 * sum(seconds) / len(seconds), 3) if seconds else 0.0
    for source, tokens in sorted(data["hit_tokens"].items()):
        out[f"hit_tokens_{source}"] = tokens
    return out


class TransferRecorder:
    """Accumulates one process's stats between two :meth:`take` calls (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data = empty()

    def record(self, op: str, nbytes: int, seconds: float, ok: bool) -> None:
        """One load or store: ``nbytes`` moved, ``seconds`` of wall time, ``ok`` (False: a load
        that wrote nothing, a store the server failed)."""
        if op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {op!r}")
        with self._lock:
            d = self._data[op]
            d["ops"] += 1
            d["bytes"] += int(nbytes)
            d["failures"] += not ok
            if len(d["seconds"]) < MAX_SAMPLES:
                d["seconds"].append(float(seconds))

    def hits(self, tokens_by_source: Mapping[str, int]) -> None:
        """External hit tokens of one admitted request, per gpukv source."""
        with self._lock:
            hits = self._data["hit_tokens"]
            for source, tokens in tokens_by_source.items():
                hits[source] = hits.get(source, 0) + int(tokens)

    def take(self) -> dict[str, Any] | None:
        """What was recorded since the last call (None: nothing)."""
        with self._lock:
            data, self._data = self._data, empty()
        return None if is_empty(data) else data


def token_bytes(views: Mapping[str, Any], dims: str) -> int:
    """Bytes one token's KV takes in this rank's registered views (all layers): each view's
    bytes per block over its block size (``BS`` in ``dims``)."""
    axis = dims.split(",").index("BS")
    total = 0
    for view in views.values():
        block = view[0]
        total += block.numel() * block.element_size() // view.shape[axis]
    return total


def failures(client: Any, method: str) -> int:
    """Calls of ``method`` the connector's guarded client failed so far (0 for a client that
    does not count them)."""
    counts = getattr(client, "failures", None)
    return counts[method] if counts is not None else 0
