"""``WorkerPath``: the worker data path's API, one definition for the embedded
:class:`gpukv.CacheEngine` and the server's :class:`gpukv.CacheClient`: each call goes to the
owner's ``copies`` (:class:`gpukv.engine.copies.WorkerCopies`, over the owner's books), so a
fix to the data path is made once."""

from __future__ import annotations

from typing import Hashable

import torch

from gpukv.engine.copies import WorkerCopies
from gpukv.engine.copy_job import Copy
from gpukv.engine.keys import TokenIds


class WorkerPath:
    """Registration, stores and retrieves of a worker's pages (see :mod:`gpukv.engine.copies`);
    the subclass sets ``self.copies``."""

    copies: WorkerCopies

    def register(self, instance_id: Hashable, model: str, kv_caches, dims: str, *,
                 kind: str = "mha", tp_rank: int = 0, tp_size: int = 1,
                 device: str | None = None) -> None:
        """Describe one worker's paged KV cache to the books (see :meth:`WorkerCopies.register`;
        through a server, its arenas are mapped too). All instances of one ``model`` must have
        the same layout fingerprint. MHA instances key their chunks by ``tp_rank``; MLA
        instances share objects across ranks. ``device``: the arena name to store into
        (default: the books' arena on the pages' device)."""
        self.copies.register(instance_id, model, kv_caches, dims, kind=kind, tp_rank=tp_rank,
                             tp_size=tp_size, device=device)

    def store(self, instance_id: Hashable, token_ids: TokenIds, slot_mapping: torch.Tensor, *,
              seed: bytes = b"", extras=None) -> int:
        """Pack the full chunks of ``token_ids`` not cached yet; returns tokens really stored
        (see :meth:`WorkerCopies.store`)."""
        return self.copies.store(instance_id, token_ids, slot_mapping, seed=seed, extras=extras)

    def start_store(self, instance_id: Hashable, token_ids: TokenIds, slot_mapping: torch.Tensor,
                    *, seed: bytes = b"", extras=None) -> Copy:
        return self.copies.start_store(instance_id, token_ids, slot_mapping, seed=seed, extras=extras)

    def retrieve(self, instance_id: Hashable, token_ids: TokenIds, slot_mapping: torch.Tensor, *,
                 request_id: Hashable, seed: bytes = b"", extras=None) -> int:
        """Unpack the prefix a lookup of ``request_id`` found, all or nothing (see
        :meth:`WorkerCopies.retrieve`). ValueError for a request that never looked up."""
        return self.copies.retrieve(instance_id, token_ids, slot_mapping, request_id=request_id,
                                    seed=seed, extras=extras)

    def start_retrieve(self, instance_id: Hashable, token_ids: TokenIds,
                       slot_mapping: torch.Tensor, *, request_id: Hashable, seed: bytes = b"",
                       extras=None) -> Copy:
        return self.copies.start_retrieve(instance_id, token_ids, slot_mapping,
                                          request_id=request_id, seed=seed, extras=extras)

    def start_store_chunks(self, instance_id: Hashable, hashes: list[bytes],
                           slot_mapping: torch.Tensor) -> Copy:
        """Store chunks already hashed (see :meth:`WorkerCopies.start_store_chunks`)."""
        return self.copies.start_store_chunks(instance_id, hashes, slot_mapping)

    def start_retrieve_chunks(self, instance_id: Hashable, hashes: list[bytes],
                              slot_mapping: torch.Tensor, *, request_id: Hashable) -> Copy:
        """Retrieve chunks already hashed (see :meth:`WorkerCopies.start_retrieve_chunks`)."""
        return self.copies.start_retrieve_chunks(instance_id, hashes, slot_mapping,
                                                 request_id=request_id)

    def finish(self, copy: Copy) -> int:
        """Complete a started store or retrieve (see :meth:`WorkerCopies.finish`)."""
        return self.copies.finish(copy)

    def begin_store_chunks(self, instance_id: Hashable, hashes: list[bytes],
                           slot_mapping: torch.Tensor) -> Copy:
        """Reserve write slots, queue nothing (see :meth:`WorkerCopies.copy_layers`)."""
        return self.copies.begin_store_chunks(instance_id, hashes, slot_mapping)

    def begin_retrieve_chunks(self, instance_id: Hashable, hashes: list[bytes],
                              slot_mapping: torch.Tensor, *, request_id: Hashable) -> Copy:
        """Pin the objects, queue nothing (see :meth:`WorkerCopies.copy_layers`)."""
        return self.copies.begin_retrieve_chunks(instance_id, hashes, slot_mapping,
                                                 request_id=request_id)

    def copy_layers(self, copy: Copy, stop: int | None = None, *, sm_budget: int | None = None):
        """Queue the next layers of a begun copy (see :meth:`WorkerCopies.copy_layers`)."""
        return self.copies.copy_layers(copy, stop, sm_budget=sm_budget)

    def abort(self, copy: Copy) -> None:
        """Give a begun copy's grant back uncompleted (see :meth:`WorkerCopies.abort`)."""
        self.copies.abort(copy)
