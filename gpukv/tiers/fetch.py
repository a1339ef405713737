"""Fetching the run of chunks a lookup needs from the tiers below L1, in one round trip per
remote tier.

Tiers with ``local_index = True`` (disk) know what they hold without I/O; the others (Redis) do
not, and asking them costs a round trip. So for one lookup:

1. the local tiers say which keys they hold (``contains_many``, from memory; first holder wins,
   in tier order);
2. each remote tier gets *one* ``load_many`` (one pipelined ``GET``, one time budget) for every
   key of the run that no local tier holds (no ``EXISTS`` first); keys it lacks go to the next;
3. the run ends at the first chunk with a key nobody had; local tiers then read their files for
   the chunks before that, chunk by chunk, stopping at the first file that fails (a bad file is
   a miss: the tier drops it).

Remote bytes of chunks past a gap are fetched in vain: the price of one round trip. Keys are the
tiers' opaque strings.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Tier(Protocol):
    name: str

    def contains_many(self, keys: list[str]) -> list[bool]: ...

    def load_many(self, keys: list[str], fingerprint: str, nbytes: int, *,
                  budget_s: float | None = None) -> list[torch.Tensor | None]: ...


def fetch_run(tiers: list[Tier], chunks: list[list[str]], fingerprint: str, nbytes: int, *,
              budget_s: float | None = None) -> tuple[int, dict[str, tuple[str, torch.Tensor]]]:
    """Fetch the leading chunks of ``chunks`` (in chain order; ``chunks[i]`` lists the keys of
    chunk ``i`` still needed, e.g. those not in L1: an empty list needs nothing).

    Returns ``(num_chunks, found)``: every key of ``chunks[:num_chunks]`` is in ``found`` as
    ``key -> (tier name, payload)`` (1-D CPU uint8 of ``nbytes``); ``chunks[num_chunks]`` (if
    any) has a key no tier could give. ``found`` holds no key of a later chunk.
    ``budget_s`` bounds each remote tier's round trip (default: that tier's ``timeout_s``).
    """
    wanted = list(dict.fromkeys(k for chunk in chunks for k in chunk))
    local = [t for t in tiers if getattr(t, "local_index", False)]
    remote = [t for t in tiers if not getattr(t, "local_index", False)]
    holder: dict[str, Tier] = {}
    for tier in local:
        rest = [k for k in wanted if k not in holder]
        if not rest:
            break
        for key, held in zip(rest, tier.contains_many(rest)):
            if held:
                holder[key] = tier
    found: dict[str, tuple[str, torch.Tensor]] = {}
    rest = [k for k in wanted if k not in holder]
    for tier in remote:
        if not rest:
            break
        payloads = tier.load_many(rest, fingerprint, nbytes, budget_s=budget_s)
        for key, payload in zip(rest, payloads):
            if payload is not None:
                found[key] = (tier.name, payload)
        rest = [k for k in rest if k not in found]
    num_chunks = 0
    for chunk in chunks:
        if not all(k in found or k in holder for k in chunk):
            break
        num_chunks += 1
    for n in range(num_chunks):
        for key in chunks[n]:
            if key in found:
                continue
            tier = holder[key]
            payload = tier.load_many([key], fingerprint, nbytes)[0]
            if payload is None:  # vanished or bad since contains_many: the run ends here
                return n, _within(found, chunks[:n])
            found[key] = (tier.name, payload)
    return num_chunks, _within(found, chunks[:num_chunks])


def _within(found: dict[str, tuple[str, torch.Tensor]],
            chunks: list[list[str]]) -> dict[str, tuple[str, torch.Tensor]]:
    keep = {k for chunk in chunks for k in chunk}
    return {k: v for k, v in found.items() if k in keep}
