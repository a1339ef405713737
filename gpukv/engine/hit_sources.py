"""Where a lookup's hit came from: one source per chunk, and the runs a LOOKUP reply carries.

Sources, nearest to the GPU first (:data:`SOURCES`): ``"gpu"`` (an L1 arena in GPU memory),
``"cpu"`` (an L1 arena in host memory), ``"disk"`` and ``"remote"`` (the Redis / Valkey tier). A
chunk whose ranks' objects came from several sources counts for the farthest of them (the one
that bounded its load). A chunk loaded from a lower tier during the lookup counts for that tier,
although the retrieve then reads its copy in L1.

On the wire a hit's sources are *runs* in chunk order, ``[[source, num_chunks], ...]``, so a
scheduler can split any token range of the hit by source (vLLM's own prefix covers the first
chunks; only the rest is external).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

SOURCES = ("gpu", "cpu", "disk", "remote")
_RANK = {name: i for i, name in enumerate(SOURCES)}


@dataclass(frozen=True, slots=True)
class LookupHit:
    """``chunks``: leading chunks held (shares taken); ``sources``: runs ``(source, num_chunks)``
    in chunk order summing to ``chunks``, or None when the server could not say (an older one)."""

    chunks: int
    sources: tuple[tuple[str, int], ...] | None = ()

    def per_chunk(self) -> list[str] | None:
        """One source per chunk (None when unknown)."""
        if self.sources is None:
            return None
        return [name for name, n in self.sources for _ in range(n)]


def farthest(a: str, b: str) -> str:
    """The source farther from the GPU of two."""
    return a if _RANK[a] >= _RANK[b] else b


def l1_source(device: str) -> str:
    """The source name of an L1 arena on ``device`` (a torch device name: ``cuda:0``, ``cpu:1``)."""
    return "gpu" if device.split(":", 1)[0] == "cuda" else "cpu"


def hit_runs(device_of: Callable[[Hashable], int], kinds: Sequence[str], keys: Sequence[Sequence],
             prefix: int, later: Sequence[str]) -> tuple[tuple[str, int], ...]:
    """The runs of a lookup's hit: ``prefix`` chunks found in L1 at once, then ``later`` (the
    source of each chunk the tier walk took: ``"L1"`` or a tier name). L1 chunks are named by
    the kind of their arenas (``kinds[arena index]``: ``gpu`` / ``cpu``; ``device_of`` gives an
    L1 key's arena); ``keys``: per rank, the lookup's L1 keys."""
    if len(set(kinds)) == 1:
        if not later:
            return ((kinds[0], prefix),) if prefix else ()
        return to_runs([kinds[0]] * prefix + [kinds[0] if s == "L1" else s for s in later])
    out = []
    for c, name in enumerate(["L1"] * prefix + list(later)):
        if name == "L1":  # the request's shares keep these objects in L1 now
            name = kinds[0]
            for rank_keys in keys:
                try:
                    name = farthest(name, kinds[device_of(rank_keys[c])])
                except KeyError:  # dropped meanwhile (a punched chunk): its retrieve fails
                    pass
        out.append(name)
    return to_runs(out)


def to_runs(per_chunk: Sequence[str]) -> tuple[tuple[str, int], ...]:
    """Run-length form of one source per chunk."""
    out: list[list] = []
    for name in per_chunk:
        if out and out[-1][0] == name:
            out[-1][1] += 1
        else:
            out.append([name, 1])
    return tuple((name, n) for name, n in out)


def parse_runs(value: object, chunks: int) -> tuple[tuple[str, int], ...]:
    """Validate runs from a reply (ValueError naming what is wrong)."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"sources must be a list of [source, chunks] runs, got {value!r:.80}")
    out = []
    for run in value:
        if (not isinstance(run, (list, tuple)) or len(run) != 2 or run[0] not in _RANK
                or isinstance(run[1], bool) or not isinstance(run[1], int) or run[1] <= 0):
            raise ValueError(f"bad sources run {run!r:.80}: need [one of {SOURCES}, chunks > 0]")
        out.append((run[0], run[1]))
    if sum(n for _, n in out) != chunks:
        raise ValueError(f"sources cover {sum(n for _, n in out)} chunks, the hit has {chunks}")
    return tuple(out)
