"""What the worker data path asks of the books, and the in-process books of the embedded engine.

The data path (:class:`gpukv.engine.copies.WorkerCopies`) runs in the worker's process and moves
the bytes; the books decide which slots a copy may touch and when it is over. They speak
:class:`Grant`: arena slots handed to one copy (write slots for a store, pinned objects for a
retrieve), given back exactly once with ``end_store`` / ``end_retrieve``. Two implementations:
:class:`LocalBooks` (a :class:`CacheCore` in this process: the embedded engine) and
:class:`gpukv.frontend.remote_books.RemoteBooks` (``gpukv serve``, over its socket).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable, Protocol

import torch

from gpukv.engine.core import CacheCore
from gpukv.engine.grants import ReadGrant, WriteGrant
from gpukv.l1.topology import device_name


@dataclass(slots=True)
class Grant:
    """Slots handed to one copy: chunk ``chunks[i]`` (an index into the hashes asked for) at
    ``offsets[i]`` bytes into arena ``devices[i]``. ``token`` is the books' own handle."""

    token: Any
    chunks: list[int]
    devices: list[int]
    offsets: list[int]

    def by_device(self) -> dict[int, list[int]]:
        """Positions of the grant's chunks, grouped by arena (one copy call each)."""
        groups: dict[int, list[int]] = {}
        for i, dev in enumerate(self.devices):
            groups.setdefault(dev, []).append(i)
        return groups


@dataclass(frozen=True, slots=True)
class Registration:
    """Where a registered instance's stores go (an arena index) and its chunk size in bytes."""

    device: int
    chunk_bytes: int


class Books(Protocol):
    """The bookkeeping the data path needs (hashes: :func:`gpukv.engine.keys.chunk_hashes`)."""

    chunk_size: int
    salt: str

    def register(self, instance_id: Hashable, model: str, layout: dict, *, kind: str,
                 tp_rank: int, tp_size: int, device: str | None,
                 pages_device: torch.device) -> Registration: ...

    def unregister(self, instance_id: Hashable) -> None: ...

    def begin_store(self, instance_id: Hashable, hashes: list[bytes]) -> Grant | None: ...

    def end_store(self, grant: Grant, ok: bool) -> int: ...

    def begin_retrieve(self, instance_id: Hashable, request_id: Hashable,
                       hashes: list[bytes]) -> Grant | None: ...

    def end_retrieve(self, grant: Grant) -> int: ...

    def arena(self, index: int, device: torch.device) -> torch.Tensor: ...


class LocalBooks:
    """:class:`Books` on a :class:`CacheCore` in this process (the embedded engine)."""

    def __init__(self, core: CacheCore) -> None:
        self.core = core
        self.chunk_size = core.config.chunk_size
        self.salt = core.config.salt

    def register(self, instance_id: Hashable, model: str, layout: dict, *, kind: str,
                 tp_rank: int, tp_size: int, device: str | None,
                 pages_device: torch.device) -> Registration:
        name = device if device is not None else device_name(pages_device)
        index = self.core.placement.arena_for(name)
        if torch.device(self.core.devices[index]).type != pages_device.type:
            raise ValueError(f"kv_caches are on {pages_device}, "
                             f"arena {self.core.devices[index]!r} is not")
        inst = self.core.register(instance_id, model, layout, kind=kind, tp_rank=tp_rank,
                                  tp_size=tp_size, device=index)
        return Registration(index, inst.chunk_bytes)

    def unregister(self, instance_id: Hashable) -> None:
        self.core.unregister(instance_id)

    def begin_store(self, instance_id: Hashable, hashes: list[bytes]) -> Grant | None:
        writes = self.core.begin_store(instance_id, hashes)
        if not writes.handles:
            return None
        return Grant(writes, writes.chunks, [h.device for h in writes.handles],
                     [h.offset for h in writes.handles])

    def end_store(self, grant: Grant, ok: bool) -> int:
        writes: WriteGrant = grant.token
        if not ok:
            self.core.abort_store(writes)
            return 0
        return self.core.commit_store(writes)

    def begin_retrieve(self, instance_id: Hashable, request_id: Hashable,
                       hashes: list[bytes]) -> Grant | None:
        reads = self.core.begin_retrieve(instance_id, hashes, request=request_id)
        if reads is None:
            return None
        return Grant(reads, list(range(len(hashes))), [h.device for h in reads.handles],
                     [h.offset for h in reads.handles])

    def end_retrieve(self, grant: Grant) -> int:
        reads: ReadGrant = grant.token
        return self.core.end_retrieve(reads)

    def arena(self, index: int, device: torch.device) -> torch.Tensor:
        arena = self.core.l1.arena(index)
        if arena.device != device:
            raise ValueError(f"arena {self.core.devices[index]!r} is on {arena.device}, the pages "
                             f"on {device}: the embedded engine copies within one device")
        return arena
