"""Resolving a caller's tensor-parallel size into extra reader shares.

One MLA object serves a whole TP group: every rank retrieves it, so a lookup takes one share per
reader and each rank's retrieve releases one. MHA shards are per rank (one reader each). The count
comes from the request, never from how many workers happen to be registered.
"""

from __future__ import annotations

from gpukv.constants import MAX_READERS


def resolve_extra_count(kind: str, tp_size: int, num_readers: int | None = None) -> int:
    """``extra_count`` for ``reserve_read``: ``readers - 1`` for MLA, 0 for MHA.

    ``readers = num_readers or tp_size``; an explicit ``num_readers`` wins (pipeline or
    decode-context-parallel setups where only some ranks read). Both must lie in [1, 128].
    """
    _check_count("tp_size", tp_size)
    if num_readers is not None:
        _check_count("num_readers", num_readers)
    if kind == "mla":
        return (num_readers or tp_size) - 1
    if kind == "mha":
        return 0
    raise ValueError(f"kind must be 'mla' or 'mha', got {kind!r}")


def legacy_extra_count(tp_size: int, world_size: int) -> int:
    """The meaning of the legacy ``(tp_size, world_size)`` pair for an MLA object.

    ``world_size`` counts the processes that look up for themselves. When fewer processes than
    TP ranks look up (one scheduler-side lookup for the whole group), that lookup takes the
    shares of all ``tp_size`` readers; when every rank looks up on its own (``world_size >=
    tp_size``), each lookup takes just its own. (8,1)->7, (4,2)->3, (8,8)->0, (1,4)->0.
    """
    _check_count("tp_size", tp_size)
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    return tp_size - 1 if world_size < tp_size else 0


def _check_count(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_READERS:
        raise ValueError(f"{name} must be an int in [1, {MAX_READERS}], got {value!r}")
