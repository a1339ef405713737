"""Extending an L1 prefix hit through the lower tiers (disk, remote).

After the leading chunks found in L1, a lookup walks on chunk by chunk: an object still in L1
gets its shares there; otherwise the first tier holding it loads it into L1 as a *temporary*
object that is born read-locked with the request's shares (``finish_write_and_reserve_read``, so
eviction cannot slip in), and freed by the retrieve that releases its last share. A chunk counts
only when every rank's object of it was found; the walk stops at the first miss.

The tier bytes of the whole remaining run come from ``gpukv.tiers.fetch.fetch_run``: the disk
answers from its index, a remote tier gets one pipelined round trip under one time budget for
everything of the run not in L1 or on disk (not one per chunk or per rank).
"""

from __future__ import annotations

from typing import Hashable

import torch

from gpukv.engine.keys import ObjectKey
from gpukv.l1 import L1Manager, Status
from gpukv.tiers.fetch import fetch_run


class TierLoader:
    """Loads chunks from ``tiers`` (in order) into ``l1`` for a lookup."""

    def __init__(self, l1: L1Manager, tiers: list) -> None:
        self.l1 = l1
        self.tiers = tiers

    def extend(self, keys: list[list[ObjectKey]], start: int, extra: int, owner: Hashable,
               fingerprint: str, nbytes: int) -> tuple[int, int, dict[str, int]]:
        """Walk on from chunk ``start``; ``keys[rank][chunk]``.

        Returns ``(end, l1_chunks, tier_chunks)``: the chunk index of the first miss, how many
        chunks after ``start`` were found in L1, and per tier name how many were loaded (a chunk
        counts for the lowest tier any of its rank objects came from).
        """
        num_chunks = len(keys[0])
        if start >= num_chunks:
            return start, 0, {}
        needed = [[k.to_str() for k in dict.fromkeys(rank_keys[n] for rank_keys in keys)
                   if k not in self.l1] for n in range(start, num_chunks)]
        _, found = fetch_run(self.tiers, needed, fingerprint, nbytes)
        per_source: dict[str, int] = {}
        n = start
        while n < num_chunks:
            got: list[ObjectKey] = []
            source = "L1"
            for rank_keys in keys:
                where = self._take_or_load(rank_keys[n], found, extra, owner, nbytes)
                if where is None:
                    break
                got.append(rank_keys[n])
                source = where if where != "L1" else source
            if len(got) < len(keys):
                if got:
                    statuses = self.l1.finish_read(got, extra, owner=owner)
                    assert all(s is Status.OK for s in statuses), statuses
                break
            per_source[source] = per_source.get(source, 0) + 1
            n += 1
        l1_chunks = per_source.pop("L1", 0)
        return n, l1_chunks, per_source

    def _take_or_load(self, key: ObjectKey, found: dict[str, tuple[str, torch.Tensor]],
                      extra: int, owner: Hashable, nbytes: int) -> str | None:
        """Shares on ``key`` in L1, or the tier bytes fetched for it; None on a miss."""
        if self.l1.reserve_read([key], extra, owner=owner)[0] is Status.OK:
            return "L1"
        hit = found.get(key.to_str())
        if hit is None:  # no tier had it (or it left L1 since the fetch)
            return None
        tier_name, payload = hit
        if self.l1.reserve_write([key], nbytes, temporary=True, owner=owner)[0] is not Status.OK:
            return None  # no room, or another request is loading it right now
        self.l1.buffer(key).copy_(payload)
        status = self.l1.finish_write_and_reserve_read([key], extra, owner=owner)[0]
        if status is not Status.OK:  # the write lease expired in between: it was discarded
            return None
        return tier_name
