"""Extending an L1 prefix hit through the lower tiers (disk, remote).

After the leading chunks found in L1, a lookup goes on from the first chunk some rank misses:

1. Which (rank, chunk) objects must come from a tier: those not ready in L1 now.
2. :func:`gpukv.tiers.fetch.fetch_run`: local tiers (disk) say which of those they hold (an
   index lookup, no I/O); a remote tier is asked once for all the rest: one pipelined GET under
   one time budget (``remote_timeout_s`` per lookup, not per chunk); disk files are read only for
   the chunks before the first gap.
3. The run of chunks where every rank's object is in L1 or was found in a tier is taken: an L1
   object gets the request's shares there; a tier hit is written into L1 as a *temporary* object
   (its write pinned, so nothing can reuse the slot under the copy) and finished with the
   request's shares in one step, so eviction cannot slip in; it is freed by the retrieve that
   releases its last share. A chunk counts only when every rank's object was taken; the walk
   stops at the first miss, and the shares of a chunk taken only in part are given back.
"""

from __future__ import annotations

import logging
from typing import Callable, Hashable

import torch

from gpukv.engine.keys import KeySpace
from gpukv.engine.registry import InternalOwner
from gpukv.l1 import L1Manager, Status
from gpukv.tiers.fetch import fetch_run

log = logging.getLogger(__name__)
LOADER = InternalOwner("loader")


class TierLoader:
    """Loads chunks from ``tiers`` (in order) into ``l1`` for a lookup."""

    def __init__(self, l1: L1Manager, tiers: list, *, budget_s: float,
                 device_of: Callable[[KeySpace], int]) -> None:
        self.l1 = l1
        self.tiers = tiers
        self.budget_s = budget_s
        self.device_of = device_of

    def extend(self, spaces: list[KeySpace], hashes: list[bytes], start: int, extra: int,
               owner: Hashable, fingerprint: str, nbytes: int) -> list[str]:
        """Walk on from chunk ``start``. Returns the source of each chunk taken, in order from
        ``start`` up to the first miss: ``"L1"`` when every rank's object was in L1, else the
        name of the lowest tier any rank's object was loaded from."""
        if start >= len(hashes):
            return []
        keys = [space.keys(hashes) for space in spaces]
        found = self._find(spaces, keys, start, fingerprint, nbytes)
        sources: list[str] = []
        n = start
        while n < len(hashes):
            got, source = [], "L1"
            for rank, space in enumerate(spaces):
                where = self._take(space, keys[rank][n], found.get((rank, n)), extra, owner,
                                   fingerprint, nbytes)
                if where is None:
                    break
                got.append(keys[rank][n])
                source = where if where != "L1" else source
            if len(got) < len(spaces):
                self.l1.release_owner(owner, got)
                break
            sources.append(source)
            n += 1
        return sources

    def _find(self, spaces, keys, start, fingerprint, nbytes) -> dict:
        """(rank, chunk) -> (tier name, payload) for the objects of the leading chunks from
        ``start`` that are not in L1 now, up to the first chunk no tier holds for some rank
        (:func:`gpukv.tiers.fetch.fetch_run`: one round trip per remote tier)."""
        num_chunks = len(keys[0])
        names = [[spaces[r].tier_key(keys[r][c]) for r in range(len(spaces))
                  if keys[r][c] not in self.l1] for c in range(start, num_chunks)]
        try:
            _, found = fetch_run(self.tiers, names, fingerprint, nbytes, budget_s=self.budget_s)
        except Exception:  # noqa: BLE001 - a failing tier is a miss, never a failed lookup
            log.warning("lookup: the tiers failed; treated as a miss", exc_info=True)
            return {}
        out = {}
        for c in range(start, num_chunks):
            for r, space in enumerate(spaces):
                hit = found.get(space.tier_key(keys[r][c]))
                if hit is not None:
                    out[(r, c)] = hit
        return out

    def _take(self, space: KeySpace, key: bytes, hit, extra: int, owner: Hashable,
              fingerprint: str, nbytes: int) -> str | None:
        """Shares on ``key`` in L1, or a load of the tier hit; None on a miss."""
        if self.l1.reserve_read([key], extra, owner=owner, top_up=True)[0] is Status.OK:
            return "L1"
        if hit is None:
            return None
        tier_name, payload = hit
        statuses, (handle,) = self.l1.reserve_write_slots([key], nbytes, temporary=True,
                                                          owner=LOADER, device=self.device_of(space))
        if statuses[0] is not Status.OK:
            return None  # no room, or another request is loading it right now
        try:
            arena = self.l1.arena(handle.device)
            arena[handle.offset:handle.offset + nbytes].copy_(payload.view(torch.uint8))
        except BaseException:
            self.l1.abort_write([handle])
            raise
        status = self.l1.finish_write([handle], extra_count=extra, reader=owner)[0]
        return tier_name if status is Status.OK else None  # NOT_FOUND: expired meanwhile
