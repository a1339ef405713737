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
queue nothing (each copy a :class:`~gpukv.engine.copy_job.Copy`, which owns its own completion);
:meth:`copy_layers` then queues the next layers of every chunk (the chunk format is
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
from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

import torch

from gpukv.engine.books import Books, Grant
from gpukv.engine.chunks import check_id, chunks_to_read, describe, full_chunks
from gpukv.engine.copy_job import Copy
from gpukv.engine.keys import TokenIds, chunk_hashes, request_seed
from gpukv.paged.copy import check_slot_mapping
from gpukv.paged.layout import PagedKV
from gpukv.paged.staging import Fence

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
            return self._copy("store", t0)
        copy = self._copy("store", t0, 0, grant, pages)
        copy.map_parts(slot_mapping, [chunks[i] for i in grant.chunks])
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
            return self._copy("retrieve", t0, whole)
        grant = self.books.begin_retrieve(instance_id, request_id, [hashes[i] for i in chunks])
        if grant is None:
            log.debug("retrieve %r: a chunk is missing, nothing written", request_id)
            return self._copy("retrieve", t0)
        copy = self._copy("retrieve", t0, whole, grant, pages)
        copy.map_parts(slot_mapping, [chunks[i] for i in grant.chunks])
        return copy

    # ---- completion (each a :class:`~gpukv.engine.copy_job.Copy`'s own, once per copy) ------
    def copy_layers(self, copy: Copy, stop: int | None = None, *,
                    sm_budget: int | None = None) -> Fence | None:
        """Queue layers ``[copy.layers_queued, stop)`` of a begun copy (:meth:`Copy.queue_layers`)."""
        return copy.queue_layers(stop, sm_budget=sm_budget)

    def abort(self, copy: Copy) -> None:
        """Give a begun copy's grant back without completing it (:meth:`Copy.abort`)."""
        copy.abort()

    def finish(self, copy: Copy) -> int:
        """Wait for ``copy``'s fence, then commit or release its grant (:meth:`Copy.finish`)."""
        return copy.finish()

    # ---- helpers --------------------------------------------------------------------------
    def _copy(self, op: str, t0: float, tokens: int = 0, grant: Grant | None = None,
              pages: Pages | None = None) -> Copy:
        return Copy(op, grant, tokens, t0, self.books, self.backend, self._on_finish,
                    pages.chunk_bytes if pages is not None else 0,
                    pages.paged if pages is not None else None)

    def _local(self, instance_id: Hashable) -> Pages:
        check_id(instance_id, "instance_id")
        pages = self._pages.get(instance_id)
        if pages is None:
            raise ValueError(f"unknown instance {instance_id!r}: register() it first")
        pages.check_unchanged(instance_id)
        return pages

