"""Which chunks of a prompt a store or a retrieve moves, and their slots: the helpers the
embedded engine and the client share (both run the copies, on a worker's pages).

A slot mapping has one page slot per token (``slot = block * block_size + offset``, ``-1`` =
padding). A store takes only *full* chunks (no ``-1``); a retrieve reads every chunk with at
least one valid slot (a chunk of ``-1`` only is the caller's own: vLLM's prefix-cache hit).
"""

from __future__ import annotations

from typing import Sequence

import torch

from gpukv.paged.layout import PagedKV


def describe(paged: PagedKV) -> dict:
    """The layout description the books size chunks from (``PagedKV.describe()``)."""
    if hasattr(paged, "describe"):
        return paged.describe()
    return dict(kind=paged.kind, dims=paged.dims, dtype=str(paged.dtype).removeprefix("torch."),
                num_layers=paged.num_layers, num_kv=paged.num_kv, num_heads=paged.num_heads,
                head_bytes=paged.head_bytes, row_bytes=paged.row_bytes,
                block_size=paged.block_size, num_blocks=paged.num_blocks)


def full_chunks(slots: torch.Tensor, num_chunks: int, chunk_size: int) -> list[int]:
    """Indices of the chunks whose slots are all valid (a chunk with a -1 slot is not stored)."""
    if not num_chunks:
        return []
    valid = (slots[: num_chunks * chunk_size].view(num_chunks, chunk_size) >= 0).all(1)
    return valid.nonzero().flatten().tolist()


def chunks_to_read(slots: torch.Tensor, num_chunks: int, chunk_size: int) -> list[int]:
    """Indices of the chunks with at least one valid slot (a chunk whose slots are all -1 is
    not read: the caller has it already)."""
    if not num_chunks:
        return []
    wanted = (slots[: num_chunks * chunk_size].view(num_chunks, chunk_size) >= 0).any(1)
    return wanted.nonzero().flatten().tolist()


def chunk_slots(slots: torch.Tensor, chunks: Sequence[int], chunk_size: int) -> torch.Tensor:
    """The slot mapping of ``chunks`` (indices), concatenated in that order."""
    index = (torch.as_tensor(chunks, dtype=torch.int64)[:, None] * chunk_size
             + torch.arange(chunk_size)).flatten()
    return slots.index_select(0, index.to(slots.device))


def by_device(handles) -> dict[int, list[int]]:
    """Positions of ``handles`` grouped by arena index."""
    groups: dict[int, list[int]] = {}
    for i, h in enumerate(handles):
        groups.setdefault(h.device, []).append(i)
    return groups


def token_range(start_token: int, end_token: int | None, chunk_size: int) -> tuple[int, int | None]:
    """The chunks lying wholly inside ``[start_token, end_token)``."""
    for name, value in (("start_token", start_token), ("end_token", end_token)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if end_token is not None and end_token < start_token:
        raise ValueError(f"end_token {end_token} is before start_token {start_token}")
    start = -(-start_token // chunk_size)
    return start, None if end_token is None else end_token // chunk_size


def check_id(value, name: str) -> None:
    """TypeError naming ``name`` unless ``value`` can be an id (hashable: a str or an int)."""
    try:
        hash(value)
    except TypeError:
        raise TypeError(f"{name} must be hashable (a str or an int), got "
                        f"{type(value).__name__} {value!r:.60}") from None
