"""``WorkerCopies``: the worker data path, one implementation for the embedded engine and for a
``gpukv serve`` client.

It owns a worker's registered pages and runs its copies: hash the prompt's full chunks, check
the slot mapping, choose the chunks to move, ask the books for slots (:class:`Grant`), queue the
pack/unpack (one call per arena), fence it, and give the grant back once the copy is over. Every
store and retrieve is two steps, :meth:`start_store` / :meth:`start_retrieve` (queue the copy,
never wait for the device) and :meth:`finish` (wait for the copy's fence, then commit or release);
:meth:`store` and :meth:`retrieve` do both. A connector that defers :meth:`finish` to the next
engine step never makes the host wait on the GPU.

Layer by layer: :meth:`begin_retrieve_chunks` / :meth:`begin_store_chunks` take the grant and
queue nothing; :meth:`copy_layers` then queues the next layers of every chunk (the chunk format is
layer-major) and returns a :class:`Fence` for just those layers, so a connector can let layer ``l``
of the forward run as soon as layer ``l``'s slices are in; :meth:`finish` once every layer is
queued, or :meth:`abort` to give a grant back without copying the rest. The copies run on the
caller's current stream (a caller that wants them beside the model sets a side stream and an SM
budget).

Rules every path keeps:

- the books are told a copy is over (commit, release, abort) only after it is: a launch that
  raises first waits for whatever it queued, then gives the grant back, then re-raises;
- a retrieve is all or nothing (every chunk it had to read, or 0 tokens and nothing written);
- a registered tensor whose storage changed since ``register`` (``set_()``, a re-allocation) is
  refused, never written through its old address.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Hashable, Sequence

import torch

from gpukv.engine.books import Books, Grant
from gpukv.engine.chunks import check_id, chunk_slots, chunks_to_read, describe, full_chunks
from gpukv.engine.keys import TokenIds, chunk_hashes, request_seed
from gpukv.paged.copy import check_slot_mapping, pack, unpack
from gpukv.paged.layout import PagedKV
from gpukv.paged.staging import Fence, fenced_on_error

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Pages:
    """One registered instance: its pages, the arena its stores go to, its chunk size."""

    paged: PagedKV
    device: int
    chunk_bytes: int
    ptrs: tuple[int, ...]  # each registered tensor's address at register time

    def check_unchanged(self, instance_id: Hashable) -> None:
        for i, (t, ptr) in enumerate(zip(self.paged.tensors, self.ptrs)):
            if t.data_ptr() != ptr:
                raise ValueError(f"instance {instance_id!r}: registered tensor {i} now lives at "
                                 f"{t.data_ptr():#x}, not {ptr:#x} (its storage changed after "
                                 "register): unregister and register it again")


@dataclass(slots=True)
class Copy:
    """A store or retrieve begun by ``begin_*`` / ``start_*``; :meth:`WorkerCopies.finish` (or
    :meth:`WorkerCopies.abort`) completes it once. ``grant`` None: nothing to copy (``tokens`` is
    then the final answer). ``parts``: per arena, the (arena, slot mapping, offsets) of its
    chunks; ``layers_queued``: layers ``[0, layers_queued)`` of every chunk are queued."""

    op: str
    grant: Grant | None
    fence: Fence | None
    tokens: int
    t0: float
    chunk_bytes: int = 0
    finished: bool = False
    paged: PagedKV | None = None
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    layers_queued: int = 0

    @property
    def num_layers(self) -> int:
        return self.paged.num_layers if self.paged is not None else 0

    @property
    def nbytes(self) -> int:
        """Bytes this copy moves (its granted chunks, every layer)."""
        return len(self.grant.chunks) * self.chunk_bytes if self.grant is not None else 0

    def ready(self) -> bool:
        """Whether :meth:`WorkerCopies.finish` would return without waiting for the device."""
        return self.fence is None or self.fence.done()


class WorkerCopies:
    """A worker's pages and copies over ``books`` (see the module docstring). ``backend``
    forces a copy backend (see :func:`gpukv.paged.copy.pack`). ``on_finish(op, seconds)`` is
    called after each finished copy that moved something."""

    def __init__(self, books: Books, *, backend: str | None = None,
                 on_finish: Callable[[str, float], None] | None = None) -> None:
        self.books, self.backend, self._on_finish = books, backend, on_finish
        self._pages: dict[Hashable, Pages] = {}

    @property
    def chunk_size(self) -> int:
        return self.books.chunk_size

    def hashes(self, token_ids: TokenIds, seed: bytes = b"", extras=None) -> list[bytes]:
        """The chained hashes of the full chunks of ``token_ids`` (the books' salt and chunk)."""
        return chunk_hashes(token_ids, self.books.chunk_size,
                            seed=request_seed(self.books.salt, seed), extras=extras)

    # ---- registration ---------------------------------------------------------------------
    def register(self, instance_id: Hashable, model: str, kv_caches, dims: str, *,
                 kind: str = "mha", tp_rank: int = 0, tp_size: int = 1,
                 device: str | None = None) -> None:
        """Describe one worker's paged KV cache (a list, tuple or dict name -> tensor, in layer
        order: see :meth:`PagedKV.from_tensors`) to the books. ``device`` names the arena its
        stores go to (default: the books' arena for the pages' device)."""
        check_id(instance_id, "instance_id")
        if isinstance(kv_caches, dict):
            kv_caches = list(kv_caches.values())
        paged = PagedKV.from_tensors(kv_caches, dims, kind=kind)
        reg = self.books.register(instance_id, model, describe(paged), kind=paged.kind,
                                  tp_rank=tp_rank, tp_size=tp_size, device=device,
                                  pages_device=paged.device)
        self._pages[instance_id] = Pages(paged, reg.device, reg.chunk_bytes,
                                         tuple(t.data_ptr() for t in paged.tensors))

    def unregister(self, instance_id: Hashable) -> None:
        """Forget an instance (its stored chunks stay cached for the others)."""
        self._local(instance_id)
        self.books.unregister(instance_id)
        del self._pages[instance_id]

    def forget(self, instance_id: Hashable) -> None:
        """Drop an instance on this side only (the books lost it: a server restart, a reap)."""
        self._pages.pop(instance_id, None)

    def registered(self, instance_id: Hashable) -> bool:
        return instance_id in self._pages

    def kind(self, instance_id: Hashable) -> str:
        return self._local(instance_id).paged.kind

    # ---- store ----------------------------------------------------------------------------
    def store(self, instance_id: Hashable, token_ids: TokenIds, slot_mapping: torch.Tensor, *,
              seed: bytes = b"", extras=None) -> int:
        """Pack the full chunks of ``token_ids`` not cached yet; returns the tokens stored.
        ``slot_mapping``: one slot per token (int32/int64; a chunk with a ``-1`` is not stored);
        on CUDA the worker's writes to those slots must be queued before this call on the
        current stream. Returns once the chunks are committed."""
        return self.finish(self.start_store(instance_id, token_ids, slot_mapping, seed=seed,
                                            extras=extras))

    def start_store(self, instance_id: Hashable, token_ids: TokenIds, slot_mapping: torch.Tensor,
                    *, seed: bytes = b"", extras=None) -> Copy:
        """Reserve slots and queue the pack; :meth:`finish` commits it."""
        pages = self._local(instance_id)
        check_slot_mapping(pages.paged, slot_mapping, len(token_ids),
                           f"one per token ({len(token_ids)})")
        hashes = self.hashes(token_ids, seed, extras)
        return self._start_store(instance_id, pages, hashes, slot_mapping)

    def start_store_chunks(self, instance_id: Hashable, hashes: Sequence[bytes],
                           slot_mapping: torch.Tensor, *, sm_budget: int | None = None) -> Copy:
        """:meth:`start_store` of chunks already hashed (e.g. only a prompt's new chunks:
        :func:`gpukv.engine.keys.chunk_hashes` with ``after=``): ``slot_mapping`` has one slot
        per token of those chunks (``len(hashes) * chunk_size``)."""
        copy = self.begin_store_chunks(instance_id, hashes, slot_mapping)
        self.copy_layers(copy, sm_budget=sm_budget)
        return copy

    def begin_store_chunks(self, instance_id: Hashable, hashes: Sequence[bytes],
                           slot_mapping: torch.Tensor) -> Copy:
        """Reserve the write slots of chunks already hashed and queue nothing yet (see
        :meth:`copy_layers`)."""
        pages = self._local(instance_id)
        n = len(hashes) * self.chunk_size
        check_slot_mapping(pages.paged, slot_mapping, n, f"len(hashes) * chunk_size = {n}")
        return self._begin_store(instance_id, pages, list(hashes), slot_mapping)

    def _start_store(self, instance_id: Hashable, pages: Pages, hashes: list[bytes],
                     slot_mapping: torch.Tensor) -> Copy:
        copy = self._begin_store(instance_id, pages, hashes, slot_mapping)
        self.copy_layers(copy)
        return copy

    def _begin_store(self, instance_id: Hashable, pages: Pages, hashes: list[bytes],
                     slot_mapping: torch.Tensor) -> Copy:
        t0 = time.perf_counter()
        chunks = full_chunks(slot_mapping, len(hashes), self.chunk_size)
        grant = self.books.begin_store(instance_id, [hashes[i] for i in chunks]) if chunks else None
        if grant is None:
            return Copy("store", None, None, 0, t0)
        copy = Copy("store", grant, None, 0, t0, pages.chunk_bytes, paged=pages.paged)
        self._plan_parts(copy, pages, slot_mapping, [chunks[i] for i in grant.chunks])
        return copy

    # ---- retrieve -------------------------------------------------------------------------
    def retrieve(self, instance_id: Hashable, token_ids: TokenIds, slot_mapping: torch.Tensor, *,
                 request_id: Hashable, seed: bytes = b"", extras=None) -> int:
        """Unpack the full chunks of ``token_ids`` (a prefix a lookup of ``request_id`` found)
        into the pages: returns ``len(token_ids) // chunk_size * chunk_size`` once they are
        there, or 0 with nothing written if a chunk it had to read is missing. Chunks whose
        slots are all ``-1`` are not read (the caller holds them); other ``-1`` slots are
        skipped. One of the request's shares per object read is released afterwards."""
        return self.finish(self.start_retrieve(instance_id, token_ids, slot_mapping,
                                               request_id=request_id, seed=seed, extras=extras))

    def start_retrieve(self, instance_id: Hashable, token_ids: TokenIds,
                       slot_mapping: torch.Tensor, *, request_id: Hashable, seed: bytes = b"",
                       extras=None) -> Copy:
        """Pin the objects and queue the unpack; :meth:`finish` releases them."""
        check_id(request_id, "request_id")
        pages = self._local(instance_id)
        check_slot_mapping(pages.paged, slot_mapping, len(token_ids),
                           f"one per token ({len(token_ids)})")
        hashes = self.hashes(token_ids, seed, extras)
        return self._start_retrieve(instance_id, pages, hashes, slot_mapping, request_id)

    def start_retrieve_chunks(self, instance_id: Hashable, hashes: Sequence[bytes],
                              slot_mapping: torch.Tensor, *, request_id: Hashable,
                              sm_budget: int | None = None) -> Copy:
        """:meth:`start_retrieve` of chunks already hashed: ``slot_mapping`` has one slot per
        token of those chunks (``len(hashes) * chunk_size``)."""
        copy = self.begin_retrieve_chunks(instance_id, hashes, slot_mapping, request_id=request_id)
        self.copy_layers(copy, sm_budget=sm_budget)
        return copy

    def begin_retrieve_chunks(self, instance_id: Hashable, hashes: Sequence[bytes],
                              slot_mapping: torch.Tensor, *, request_id: Hashable) -> Copy:
        """Pin the objects of chunks already hashed and queue nothing yet (see
        :meth:`copy_layers`); ``copy.grant`` None with ``copy.tokens`` 0: a chunk is missing."""
        check_id(request_id, "request_id")
        pages = self._local(instance_id)
        n = len(hashes) * self.chunk_size
        check_slot_mapping(pages.paged, slot_mapping, n, f"len(hashes) * chunk_size = {n}")
        return self._begin_retrieve(instance_id, pages, list(hashes), slot_mapping, request_id)

    def _start_retrieve(self, instance_id: Hashable, pages: Pages, hashes: list[bytes],
                        slot_mapping: torch.Tensor, request_id: Hashable) -> Copy:
        copy = self._begin_retrieve(instance_id, pages, hashes, slot_mapping, request_id)
        self.copy_layers(copy)
        return copy

    def _begin_retrieve(self, instance_id: Hashable, pages: Pages, hashes: list[bytes],
                        slot_mapping: torch.Tensor, request_id: Hashable) -> Copy:
        t0 = time.perf_counter()
        whole = len(hashes) * self.chunk_size
        chunks = chunks_to_read(slot_mapping, len(hashes), self.chunk_size)
        if not chunks:
            return Copy("retrieve", None, None, whole, t0)
        grant = self.books.begin_retrieve(instance_id, request_id, [hashes[i] for i in chunks])
        if grant is None:
            log.debug("retrieve %r: a chunk is missing, nothing written", request_id)
            return Copy("retrieve", None, None, 0, t0)
        copy = Copy("retrieve", grant, None, whole, t0, pages.chunk_bytes, paged=pages.paged)
        self._plan_parts(copy, pages, slot_mapping, [chunks[i] for i in grant.chunks])
        return copy

    # ---- completion -----------------------------------------------------------------------
    def copy_layers(self, copy: Copy, stop: int | None = None, *,
                    sm_budget: int | None = None) -> Fence | None:
        """Queue layers ``[copy.layers_queued, stop)`` (``stop`` None: every layer left) of every
        chunk of a begun copy and fence them; returns that fence (None: nothing to copy). If
        queueing fails: wait for what was queued, give the grant back, re-raise (the copy is
        then finished)."""
        if copy.finished:
            raise ValueError(f"this {copy.op} was finished already")
        if copy.grant is None:
            return None
        stop = copy.num_layers if stop is None else stop
        if not isinstance(stop, int) or not copy.layers_queued < stop <= copy.num_layers:
            raise ValueError(f"stop {stop!r} must be in ({copy.layers_queued}, {copy.num_layers}] "
                             f"(layers [0, {copy.layers_queued}) are queued already)")
        op = pack if copy.op == "store" else unpack
        layers = None if (copy.layers_queued, stop) == (0, copy.num_layers) else (copy.layers_queued, stop)
        try:
            with fenced_on_error(copy.paged.device):
                for arena, slots, offsets in copy.parts:
                    op(copy.paged, slots, arena, offsets, chunk_size=self.chunk_size,
                       backend=self.backend, layers=layers, sm_budget=sm_budget)
        except BaseException:
            copy.finished = True
            self._give_back(copy)
            raise
        copy.layers_queued = stop
        copy.fence = Fence(copy.paged.device)
        return copy.fence

    def abort(self, copy: Copy) -> None:
        """Give a begun copy's grant back without completing it (a store commits nothing; a
        retrieve releases its shares and pins, its pages' bytes are not to be used): after
        waiting for whatever it queued. Once per copy, instead of :meth:`finish`."""
        if copy.finished:
            raise ValueError(f"this {copy.op} was finished already")
        copy.finished = True
        if copy.grant is None:
            return
        if copy.fence is not None:
            copy.fence.wait()
        self._give_back(copy)

    def finish(self, copy: Copy) -> int:
        """Wait for ``copy``'s fence, then commit (store) or release (retrieve) its grant;
        returns the tokens stored / retrieved. Once per copy, once every layer is queued."""
        if copy.finished:
            raise ValueError(f"this {copy.op} was finished already")
        if copy.grant is not None and copy.layers_queued != copy.num_layers:
            raise ValueError(f"this {copy.op} has queued {copy.layers_queued} of {copy.num_layers} "
                             "layers: copy_layers() the rest, or abort() it")
        copy.finished = True
        if copy.grant is None:
            return copy.tokens
        try:
            copy.fence.wait()
        except BaseException:
            log.error("a gpukv %s failed on the device: its slots stay out of circulation until "
                      "the server's lease on them expires", copy.op)
            raise
        if copy.op == "store":
            tokens = self.books.end_store(copy.grant, ok=True) * self.chunk_size
            moved = tokens // self.chunk_size
        else:
            self.books.end_retrieve(copy.grant)
            tokens, moved = copy.tokens, len(copy.grant.chunks)
        seconds = time.perf_counter() - copy.t0
        if self._on_finish is not None:
            self._on_finish(copy.op, seconds)
        if log.isEnabledFor(logging.DEBUG):
            nbytes = moved * copy.chunk_bytes
            log.debug("%s: %d tokens in %.3f s (%.2f GB/s)", copy.op, moved * self.chunk_size,
                      seconds, nbytes / max(seconds, 1e-9) / 1e9)
        return tokens

    # ---- helpers --------------------------------------------------------------------------
    def _plan_parts(self, copy: Copy, pages: Pages, slots: torch.Tensor, chunks: Sequence[int]) -> None:
        """``copy.parts``: chunk ``chunks[i]`` with the grant's slot ``i``, grouped by arena (one
        copy call each). If mapping an arena fails, the grant is given back first."""
        grant, cs = copy.grant, self.chunk_size
        try:
            for dev, where in grant.by_device().items():
                arena = self.books.arena(dev, pages.paged.device)
                offsets = torch.tensor([grant.offsets[i] for i in where], dtype=torch.int64)
                copy.parts.append((arena, chunk_slots(slots, [chunks[i] for i in where], cs), offsets))
        except BaseException:
            copy.finished = True
            self._give_back(copy)
            raise

    def _give_back(self, copy: Copy) -> None:
        """Return a grant whose copy will not complete (the caller waited for what it queued)."""
        try:
            if copy.op == "store":
                self.books.end_store(copy.grant, ok=False)
            else:
                self.books.end_retrieve(copy.grant)
        except Exception as exc:  # the books are unreachable: their lease reclaims the slots
            log.warning("gpukv: could not give back the slots of a failed copy: %s", exc)

    def _local(self, instance_id: Hashable) -> Pages:
        check_id(instance_id, "instance_id")
        pages = self._pages.get(instance_id)
        if pages is None:
            raise ValueError(f"unknown instance {instance_id!r}: register() it first")
        pages.check_unchanged(instance_id)
        return pages

