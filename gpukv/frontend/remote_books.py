"""``RemoteBooks``: the books of the worker data path kept by ``gpukv serve``, over its socket.

It turns :class:`gpukv.engine.books.Books` calls into REGISTER / STORE_BEGIN / STORE_COMMIT /
RETRIEVE_BEGIN / RETRIEVE_END requests, checks every reply before the data path acts on it (a
reply naming an arena, a chunk or an offset the request could not have meant is a
:class:`ServerError`, never an index that Python would wrap around), and maps the server's arenas
into this process (CPU: its sealed memfd; CUDA: IPC handles), once per server.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable

import torch

from gpukv.engine.books import Grant, Registration
from gpukv.frontend import protocol as p
from gpukv.frontend.channel import ServerError
from gpukv.l1.cuda_arena import MAPPINGS
from gpukv.l1.memory import open_cpu
from gpukv.l1.topology import TorchGpus, device_name, mla_shared


class RemoteBooks:
    """:class:`Books` through ``call`` (a :meth:`CacheClient._call`: one request, its reply's
    value). ``chunk_size`` and ``salt`` are the server's (from its PING reply)."""

    def __init__(self, call: Callable[..., Any], chunk_size: int, salt: str,
                 arena_names: list[str] | None = None) -> None:
        """``arena_names``: the server's arenas across processes (its PING reply's ``arenas``),
        to decide whether this worker's MLA objects can be shared (see :mod:`gpukv.l1.topology`)."""
        self._call, self.chunk_size, self.salt = call, chunk_size, salt
        self.arena_names = list(arena_names or [])
        self._handles: list[dict] = []
        self._arenas: dict[tuple[int, str], torch.Tensor] = {}
        self._maps: list = []

    def register(self, instance_id: Hashable, model: str, layout: dict, *, kind: str,
                 tp_rank: int, tp_size: int, device: str | None,
                 pages_device: torch.device) -> Registration:
        own = device_name(pages_device)
        shared = kind != "mla" or not self.arena_names or \
            mla_shared(own, self.arena_names, TorchGpus())
        reply = self._call(p.Register(instance_id, model, p.Layout(**layout), tp_rank, tp_size,
                                      device if device is not None else own, shared))
        arenas = reply.get("arenas") if isinstance(reply, dict) else None
        if not isinstance(arenas, list) or not arenas or \
                not all(isinstance(h, dict) for h in arenas):
            raise ServerError(f"REGISTER reply has no arena handles: {reply!r:.200}")
        if arenas != self._handles:  # another server (e.g. restarted): map its arenas
            # (the old maps go with the last copy still using them: a tensor holds its map)
            self._handles, self._arenas, self._maps = arenas, {}, []
        index = _index(reply.get("device"), len(arenas), "arena")
        chunk_bytes = reply.get("chunk_bytes")
        if not isinstance(chunk_bytes, int) or isinstance(chunk_bytes, bool) or chunk_bytes <= 0:
            raise ServerError(f"REGISTER reply has chunk_bytes {chunk_bytes!r}")
        self.arena(index, pages_device)  # map it now: a bad handle fails the registration
        return Registration(index, chunk_bytes)

    def unregister(self, instance_id: Hashable) -> None:
        self._call(p.Unregister(instance_id))

    def begin_store(self, instance_id: Hashable, hashes: list[bytes]) -> Grant | None:
        reply = self._call(p.StoreBegin(instance_id, hashes))
        plan = reply.get("plan") if isinstance(reply, dict) else None
        if not plan:
            return None
        chunks, offsets, devices = reply.get("chunks"), reply.get("offsets"), reply.get("devices")
        _check_lists(chunks, offsets, len(hashes), "STORE_BEGIN")
        if chunks != sorted(set(chunks)):
            raise ServerError(f"STORE_BEGIN reply names chunks {chunks!r:.120} (not increasing)")
        if not isinstance(devices, list) or len(devices) != len(chunks):
            raise ServerError(f"STORE_BEGIN reply has devices {devices!r:.80} "
                              f"for {len(chunks)} chunks")
        for dev in devices:
            _index(dev, len(self._handles), "arena")
        return Grant(plan, chunks, devices, offsets)

    def end_store(self, grant: Grant, ok: bool) -> int:
        stored = self._call(p.StoreCommit(grant.token, ok=ok))
        if not isinstance(stored, int) or not 0 <= stored <= len(grant.chunks):
            raise ServerError(f"STORE_COMMIT reply {stored!r} for {len(grant.chunks)} chunks")
        return stored

    def begin_retrieve(self, instance_id: Hashable, request_id: Hashable,
                       hashes: list[bytes]) -> Grant | None:
        reply = self._call(p.RetrieveBegin(instance_id, request_id, hashes))
        plan = reply.get("plan") if isinstance(reply, dict) else None
        if not plan:
            return None
        devices, offsets = reply.get("devices"), reply.get("offsets")
        _check_lists(devices, offsets, len(hashes), "RETRIEVE_BEGIN", exact=True)
        for dev in devices:
            _index(dev, len(self._handles), "arena")
        return Grant(plan, list(range(len(hashes))), devices, offsets)

    def end_retrieve(self, grant: Grant) -> int:
        return self._call(p.RetrieveEnd(grant.token))

    def arena(self, index: int, device: torch.device) -> torch.Tensor:
        """Arena ``index`` mapped into this process (once per server)."""
        key = (index, str(device) if device.type == "cuda" else "cpu")
        arena = self._arenas.get(key)
        if arena is None:
            handle = self._handles[_index(index, len(self._handles), "arena")]
            if handle.get("kind") == "memfd":
                arena, mapped = open_cpu(handle)
                self._maps.append(mapped)
            else:  # under this worker's own device, whichever GPU the arena is on
                arena = MAPPINGS.open(handle, device)
            self._arenas[key] = arena
        if arena.device.type != device.type:
            raise ValueError(f"the server's arena {index} is on {arena.device}, these pages on "
                             f"{device}: register pages on the arena's device type")
        return arena


def _index(value: Any, size: int, what: str) -> int:
    """``value`` as an index into ``size`` items; ServerError for anything else (a -1 too)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < size:
        raise ServerError(f"the server named {what} {value!r}, not one of its {size}")
    return value


def _check_lists(first: Any, offsets: Any, num_hashes: int, what: str, *,
                 exact: bool = False) -> None:
    """Per-chunk lists of a BEGIN reply: equal lengths, ints in range, offsets >= 0."""
    if not isinstance(first, list) or not isinstance(offsets, list) or len(first) != len(offsets):
        raise ServerError(f"{what} reply has malformed per-chunk lists: {first!r:.80}, "
                          f"{offsets!r:.80}")
    if (exact and len(first) != num_hashes) or len(first) > num_hashes or not first:
        raise ServerError(f"{what} reply names {len(first)} chunks for {num_hashes} asked")
    if what == "STORE_BEGIN":
        for c in first:
            _index(c, num_hashes, "chunk")
    for off in offsets:
        if isinstance(off, bool) or not isinstance(off, int) or off < 0:
            raise ServerError(f"{what} reply has offset {off!r}")
