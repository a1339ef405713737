"""``ChunkChain``: the chained chunk hashes of one request, each chunk hashed once.

The scheduler side owns it: a request's hashes are computed when its lookup needs them and
extended as its tokens grow (chunked prefill, decode outputs), never recomputed, so a step's plan
names each new chunk by its hash and no worker hashes a prefix again. The hashes are exactly the
data path's (:meth:`gpukv.engine.copies.WorkerCopies.hashes`): the chain starts from the server's
salt and the request's seed (:func:`gpukv.engine.keys.request_seed`) and mixes in each chunk's
multimodal extras (:func:`.keys.chunk_extras`), so a worker's store of chunks ``[a, b)`` writes
the objects a lookup of the whole prompt finds.
"""

from __future__ import annotations

from typing import Sequence

from gpukv.engine.keys import chunk_hashes, request_seed
from gpukv.integrations.vllm.keys import MMItem, chunk_extras


class ChunkChain:
    """Hashes of the full ``chunk_size``-token chunks of one request's token list; ``salt``: the
    server's; ``seed``: the request's (:func:`.keys.request_seed`); ``mm_items``: its multimodal
    items. ``num_hashed`` counts the chunks this chain hashed (each once)."""

    __slots__ = ("chunk_size", "_seed", "_items", "hashes", "num_hashed")

    def __init__(self, chunk_size: int, *, salt: str = "", seed: bytes = b"",
                 mm_items: Sequence[MMItem] = ()) -> None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        self.chunk_size = chunk_size
        self._seed = request_seed(salt, seed)
        self._items = tuple(mm_items)
        self.hashes: list[bytes] = []
        self.num_hashed = 0

    def __len__(self) -> int:
        return len(self.hashes)

    def extend(self, token_ids: Sequence[int], num_chunks: int) -> list[bytes]:
        """The hashes of chunks ``[0, num_chunks)`` (the list itself: do not modify it), hashing
        only the chunks not hashed yet from ``token_ids`` (which must hold ``num_chunks`` full
        chunks and begin with the tokens hashed before)."""
        have, cs = len(self.hashes), self.chunk_size
        if num_chunks > have:
            if len(token_ids) < num_chunks * cs:
                raise ValueError(f"{num_chunks} chunks need {num_chunks * cs} tokens, got {len(token_ids)}")
            extras = None
            if self._items:
                extras = chunk_extras(self._items, num_chunks, cs)
                extras = extras[have:] if extras is not None else None
            tokens = token_ids[have * cs:num_chunks * cs]
            if have:
                new = chunk_hashes(tokens, cs, extras=extras, after=self.hashes[-1])
            else:
                new = chunk_hashes(tokens, cs, seed=self._seed, extras=extras)
            self.hashes.extend(new)
            self.num_hashed += len(new)
        return self.hashes
