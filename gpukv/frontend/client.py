"""``CacheClient``: the :class:`gpukv.CacheEngine` API, with the books kept by ``gpukv serve``.

A worker switches between embedded and server mode by construction alone::

    cache = CacheEngine(EngineConfig(...))                    # embedded
    cache = CacheClient("ipc:///run/user/1000/gpukv.sock")    # one server for the whole machine

Same methods, arguments and return values. The worker registers its engine's OWN KV tensors
(list, tuple or dict name -> tensor; cross-layer views included); the server answers with its
arenas' handles, which this client maps once. ``store`` asks for write slots (STORE_BEGIN), packs
its pages into them here, in this process, then commits; ``retrieve`` pins the request's objects
(RETRIEVE_BEGIN), unpacks them here and releases (RETRIEVE_END): two round trips each, and only
metadata crosses the socket.

CUDA ordering (UNTESTED: no GPU in CI): the copy runs on this worker's current stream, after its
own forward work; ``store`` sends the commit only after an event recorded after the pack has
completed, and ``retrieve`` releases its pins only after the unpack's event has completed, so the
server never hands out a slot a copy still touches. An arena on another GPU (an MLA object stored
by another rank) is copied chunk by chunk into a staging buffer on this GPU first
(``Tensor.copy_`` between devices: peer-to-peer when the driver allows it, else through host
memory), then unpacked locally.

Groups: requests are visible to the sessions of one group. The processes of one engine (its
scheduler and its workers) pass the same ``group`` secret; by default each client is a group of
its own.

Threads: any thread may call any method (the transport is :class:`gpukv.frontend.channel.Channel`:
pooled sockets, a timeout on every call, a dead server raises :class:`ServerUnavailable`, never
hangs). A daemon thread PINGs every ``worker_timeout / 4`` s so the server sees this process alive
while it idles.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Hashable

import torch

from gpukv.engine.chunks import chunk_slots, chunks_to_read, describe, full_chunks, token_range
from gpukv.engine.keys import TokenIds, chunk_hashes, request_seed
from gpukv.frontend import protocol as p
from gpukv.frontend.channel import Channel, ServerError, ServerUnavailable
from gpukv.frontend.peer import server_uid
from gpukv.l1.memory import device_name, open_cpu, open_cuda
from gpukv.ops.client_metrics import ClientMetrics
from gpukv.paged.copy import check_slot_mapping, pack, unpack
from gpukv.paged.layout import PagedKV

__all__ = ["CacheClient", "ServerError", "ServerUnavailable"]


@dataclass(slots=True)
class _Local:
    paged: PagedKV
    device: int  # arena index its stores go to
    chunk_bytes: int


class CacheClient:
    """A connection to a ``gpukv serve`` process at ``address`` (``ipc://...`` or ``tcp://...``;
    default: :func:`gpukv.frontend.protocol.default_address`, the server's default).

    ``timeout_s`` bounds every call; ``ping_interval_s`` defaults to a quarter of the server's
    worker timeout (0 disables pings); ``group``: see the module docstring.
    """

    def __init__(self, address: str | None = None, *, group: str | None = None,
                 timeout_s: float = 30.0, connect_timeout_s: float = 10.0,
                 ping_interval_s: float | None = None, backend: str | None = None) -> None:
        address = p.default_address() if address is None else address
        if not isinstance(address, str) or not address.startswith(("ipc://", "tcp://")):
            raise ValueError(f"address must be ipc://<path> or tcp://<host>:<port>, got {address!r}")
        if timeout_s <= 0 or connect_timeout_s <= 0:
            raise ValueError(f"timeouts must be positive, got {timeout_s!r}, {connect_timeout_s!r}")
        if group is not None and (not isinstance(group, str) or not 16 <= len(group) <= 128):
            raise ValueError("group must be a secret str of 16 to 128 characters")
        self.address, self.timeout_s, self.backend = address, float(timeout_s), backend
        self.session = uuid.uuid4().hex
        self.group = group
        self._locals: dict[Hashable, _Local] = {}
        self._handles: list[dict] = []
        self._arenas: dict[int, torch.Tensor] = {}
        self._maps: list = []
        self.metrics = ClientMetrics()  # round trips as this client sees them (own registry)
        self._channel = Channel(address, self.session, group, self.timeout_s,
                                self.metrics.server_unavailable)
        try:
            uid = server_uid(address)
            if uid is None:
                raise ServerUnavailable(f"no gpukv server listens on {address}")
            if uid not in (-1, os.getuid()):
                raise ValueError(f"the server at {address} runs as uid {uid}, not as this user "
                                 f"({os.getuid()}): refusing to send it anything")
            info = self._call(p.Ping(os.getpid()), timeout_s=connect_timeout_s)
        except BaseException:
            self.close()
            raise
        self.chunk_size: int = info["chunk_size"]
        self.salt: str = info["salt"]
        self.server_info: dict = info
        interval = info["worker_timeout_s"] / 4 if ping_interval_s is None else ping_interval_s
        if interval > 0:
            self._channel.keep_alive(interval)

    # ---- the engine API --------------------------------------------------------------------
    def register(self, instance_id: Hashable, model: str, kv_caches, dims: str, *,
                 kind: str = "mha", tp_rank: int = 0, tp_size: int = 1,
                 device: str | None = None) -> None:
        """Describe this worker's KV tensors to the server (see :meth:`CacheEngine.register`)
        and map the server's arenas. ``device``: the arena name to store into (default: the
        server's arena on the pages' device)."""
        if isinstance(kv_caches, dict):
            kv_caches = list(kv_caches.values())
        paged = PagedKV.from_tensors(kv_caches, dims, kind=kind)
        if device is None:
            device = device_name(paged.device)
        reply = self._call(p.Register(instance_id, model, p.Layout(**describe(paged)), tp_rank,
                                      tp_size, device))
        if reply["arenas"] != self._handles:  # another server (e.g. restarted): map its arenas
            # (the old maps go with the last copy still using them: a tensor holds its map)
            self._handles, self._arenas, self._maps = reply["arenas"], {}, []
        self._locals[instance_id] = _Local(paged, reply["device"], reply["chunk_bytes"])
        self._arena(reply["device"])  # map it now: a bad handle fails the registration

    def unregister(self, instance_id: Hashable) -> None:
        self._call(p.Unregister(instance_id))
        self._locals.pop(instance_id, None)

    def store(self, instance_id: Hashable, token_ids: TokenIds, slot_mapping: torch.Tensor, *,
              seed: bytes = b"", extras=None) -> int:
        """Tokens really stored: the full chunks not cached yet, packed here into the slots the
        server reserved, then committed (a chunk with a ``-1`` slot is not stored)."""
        local = self._local(instance_id)
        hashes = self._hashes(token_ids, seed, extras)
        check_slot_mapping(local.paged, slot_mapping, len(token_ids), f"one per token ({len(token_ids)})")
        chunks = full_chunks(slot_mapping, len(hashes), self.chunk_size)
        if not chunks:
            return 0
        t0 = time.perf_counter()
        plan = self._call(p.StoreBegin(instance_id, [hashes[i] for i in chunks]))
        if not plan["plan"]:
            return 0
        try:
            slots = chunk_slots(slot_mapping, [chunks[i] for i in plan["chunks"]], self.chunk_size)
            offsets = torch.tensor(plan["offsets"], dtype=torch.int64)
            pack(local.paged, slots, self._arena(plan["device"]), offsets,
                 chunk_size=self.chunk_size, backend=self.backend)
            _wait_for_copy(local.paged)
        except BaseException:
            self._call(p.StoreCommit(plan["plan"], ok=False))
            raise
        stored = self._call(p.StoreCommit(plan["plan"])) * self.chunk_size
        self.metrics.store(time.perf_counter() - t0)
        return stored

    def lookup(self, model: str, token_ids: TokenIds, *, request_id: Hashable, tp_size: int = 1,
               num_readers: int | None = None, seed: bytes = b"", extras=None,
               loadable: bool = False) -> int:
        """Leading tokens held; tops the request's shares up to ``num_readers or tp_size`` per
        MLA object (a repeated lookup takes no more). ``loadable``: 0 unless this client's group
        has registered instances of ``model`` for every TP rank ``0..tp_size-1`` (a scheduler
        whose workers must be able to load what it is told)."""
        hashes = self._hashes(token_ids, seed, extras)
        return self.lookup_hashes(model, hashes, request_id=request_id, tp_size=tp_size,
                                  num_readers=num_readers, loadable=loadable)

    def lookup_hashes(self, model: str, hashes: list[bytes], *, request_id: Hashable,
                      tp_size: int = 1, num_readers: int | None = None, loadable: bool = False) -> int:
        t0 = time.perf_counter()
        hit = self._call(p.Lookup(model, request_id, list(hashes), tp_size, num_readers, loadable))
        self.metrics.lookup(time.perf_counter() - t0)
        return hit

    def retrieve(self, instance_id: Hashable, token_ids: TokenIds, slot_mapping: torch.Tensor, *,
                 request_id: Hashable, seed: bytes = b"", extras=None) -> int:
        """The tokens of the full-chunk prefix once they are in this worker's pages, or 0
        (nothing written): all or nothing; chunks whose slots are all ``-1`` are not read."""
        local = self._local(instance_id)
        hashes = self._hashes(token_ids, seed, extras)
        check_slot_mapping(local.paged, slot_mapping, len(token_ids), f"one per token ({len(token_ids)})")
        chunks = chunks_to_read(slot_mapping, len(hashes), self.chunk_size)
        if not chunks:
            return len(hashes) * self.chunk_size
        t0 = time.perf_counter()
        plan = self._call(p.RetrieveBegin(instance_id, request_id, [hashes[i] for i in chunks]))
        if not plan["plan"]:
            return 0
        try:
            self._unpack(local, slot_mapping, chunks, plan["devices"], plan["offsets"])
        finally:
            self._call(p.RetrieveEnd(plan["plan"]))
        self.metrics.retrieve(time.perf_counter() - t0)
        return len(hashes) * self.chunk_size

    def free_lookup_locks(self, request_id: Hashable, *, start_token: int = 0,
                          end_token: int | None = None, tp_size: int = 1) -> int:
        """Release the request's shares on chunks inside ``[start_token, end_token)`` (all by
        default); returns how many."""
        token_range(start_token, end_token, self.chunk_size)  # ValueError naming a bad bound
        return self._call(p.FreeLookupLocks(request_id, start_token, end_token, tp_size))

    def end_session(self, request_id: Hashable) -> None:
        self._call(p.EndSession(request_id))

    def stats(self) -> dict:
        return self._call(p.Stats(), timeout_s=max(self.timeout_s, 60.0))

    def read_counts(self, model: str, token_ids: TokenIds, *, kv_rank: int = 0,
                    seed: bytes = b"") -> dict:
        """Read-only debug view of a prefix's objects: lists ``read_counts``, ``present`` and
        ``evictable``, one entry per full chunk."""
        hashes = self._hashes(token_ids, seed, None)
        return self._call(p.Stats(p.ReadCounts(model, hashes, kv_rank)))["query"]

    def read_count(self, model: str, token_ids: TokenIds, *, kv_rank: int = 0,
                   seed: bytes = b"") -> list[int]:
        """Shares held on each full chunk's object (like :meth:`CacheEngine.read_count`)."""
        return self.read_counts(model, token_ids, kv_rank=kv_rank, seed=seed)["read_counts"]

    def flush(self, timeout_s: float | None = None) -> bool:
        return self._call(p.Flush(timeout_s), timeout_s=max(self.timeout_s, (timeout_s or 0) + 5))

    def ping(self, *, timeout_s: float | None = None) -> dict:
        """The server's identity (protocol version, chunk size, salt, devices, worker timeout)."""
        return self._call(p.Ping(os.getpid()), timeout_s=timeout_s)

    def close(self) -> None:
        """Stop pinging and close the sockets (the server reaps the session after its timeout)."""
        self._channel.close()

    def __enter__(self) -> "CacheClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- copies ----------------------------------------------------------------------------
    def _unpack(self, local: _Local, slots: torch.Tensor, chunks: list[int], devices: list[int],
                offsets: list[int]) -> None:
        cs, here = self.chunk_size, local.paged.device
        groups: dict[int, list[int]] = {}
        for i, dev in enumerate(devices):
            groups.setdefault(dev, []).append(i)
        for dev, where in groups.items():
            arena = self._arena(dev)
            offs = [offsets[i] for i in where]
            if arena.device != here:  # another GPU's arena: stage its chunks here first
                staging = torch.empty(len(offs) * local.chunk_bytes, dtype=torch.uint8, device=here)
                for j, off in enumerate(offs):
                    staging[j * local.chunk_bytes:(j + 1) * local.chunk_bytes].copy_(
                        arena[off:off + local.chunk_bytes], non_blocking=True)
                arena, offs = staging, [j * local.chunk_bytes for j in range(len(offs))]
            unpack(local.paged, chunk_slots(slots, [chunks[i] for i in where], cs), arena,
                   torch.tensor(offs, dtype=torch.int64), chunk_size=cs, backend=self.backend)
        _wait_for_copy(local.paged)

    def _arena(self, index: int) -> torch.Tensor:
        arena = self._arenas.get(index)
        if arena is None:
            handle = self._handles[index]
            if handle["kind"] == "memfd":
                arena, mapped = open_cpu(handle)
                self._maps.append(mapped)
            else:
                arena = open_cuda(handle)
            self._arenas[index] = arena
        return arena

    def _local(self, instance_id: Hashable) -> _Local:
        local = self._locals.get(instance_id)
        if local is None:
            raise ValueError(f"unknown instance {instance_id!r}: register() it first")
        return local

    def _hashes(self, token_ids: TokenIds, seed: bytes, extras) -> list[bytes]:
        return chunk_hashes(token_ids, self.chunk_size, seed=request_seed(self.salt, seed),
                            extras=extras)

    # ---- transport -------------------------------------------------------------------------
    def _call(self, body, *, timeout_s: float | None = None) -> Any:
        return self._channel.call(body, timeout_s)


def _wait_for_copy(paged: PagedKV) -> None:
    """Block until this worker's copy is complete (CUDA: an event after it on the current
    stream, not a device-wide sync)."""
    if paged.device.type == "cuda":
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(paged.device))
        event.synchronize()
