"""Shared pieces of the L1 tests: short status names, a one-slot object size, a manual clock."""

from __future__ import annotations

from gpukv.l1 import L1Manager, Status

OK, NF, NR, NW, WS, LK, OOM = (Status.OK, Status.NOT_FOUND, Status.NOT_READY, Status.NOT_WRITABLE,
                               Status.WRONG_STATE, Status.LOCKED, Status.OUT_OF_MEMORY)
SIZE = 1000  # one 1024-byte slot


class Clock:
    """A clock the test moves by hand (``clock.now += 5``)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def put(l1: L1Manager, keys, **kwargs) -> None:
    """Write ``keys`` as ready objects of SIZE bytes; ``kwargs`` go to reserve_write."""
    assert l1.reserve_write(keys, SIZE, **kwargs) == [OK] * len(keys)
    assert l1.finish_write(keys, owner=kwargs.get("owner")) == [OK] * len(keys)
