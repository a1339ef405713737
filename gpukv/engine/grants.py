"""What the core hands a worker for one copy: a write grant (the arena slots to pack into,
write-pinned until commit or abort) or a read grant (the pinned objects to unpack from, until
``end_retrieve``); and the error for a request the core does not know."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Hashable

from gpukv.engine.registry import Instance
from gpukv.l1.entry import Entry


class UnknownRequest(ValueError):
    """A retrieve or free names a request that never looked up (or already ended)."""


@dataclass(slots=True)
class WriteGrant:
    """Slots to pack into: ``chunks[i]`` (an index into the hashes given) goes to
    ``handles[i]`` (``.device``, ``.offset``). ``cached``: chunks already held."""

    instance: Instance
    chunks: list[int]
    handles: list[Entry]
    cached: int
    full: int  # chunks refused for lack of room
    t0: float = field(default_factory=time.perf_counter)


@dataclass(slots=True)
class ReadGrant:
    """Pinned objects to unpack from, one per chunk of the prefix, in order."""

    instance: Instance
    request: Hashable
    handles: list[Entry]
    released: int = field(default=0)
    t0: float = field(default_factory=time.perf_counter)
