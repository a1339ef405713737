"""``Copy``: one store or retrieve of a worker, from its grant to its end.

:class:`gpukv.engine.copies.WorkerCopies` begins it (takes the grant from the books and maps the
arenas its chunks go to or come from: :meth:`Copy.map_parts`); the copy then owns the rest, each
step at most once and in order: :meth:`Copy.queue_layers` queues the next layers of every chunk
(the chunk format is layer-major) and fences them; :meth:`Copy.finish` (every layer queued) waits
for the fence and commits (store) or releases (retrieve) the grant; :meth:`Copy.abort` gives the
grant back uncompleted after waiting for what was queued. The books are told a copy is over only
after it is: a launch that raises first waits for whatever it queued, then gives the grant back,
then re-raises (the copy is then finished).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from gpukv.engine.books import Books, Grant
from gpukv.engine.chunks import chunk_slots
from gpukv.paged.copy import pack, unpack
from gpukv.paged.layout import PagedKV
from gpukv.paged.staging import Fence, fenced_on_error

log = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class Copy:
    """``grant`` None: nothing to copy (``tokens`` is then the final answer). ``parts``: per
    arena, the (arena, slot mapping, offsets) of its chunks; ``layers_queued``: layers
    ``[0, layers_queued)`` of every chunk are queued. ``on_finish(op, seconds)`` is called after
    a finished copy that moved something."""

    op: str  # "store" or "retrieve"
    grant: Grant | None
    tokens: int
    t0: float
    books: Books
    backend: str | None = None
    on_finish: Callable[[str, float], None] | None = None
    chunk_bytes: int = 0
    paged: PagedKV | None = None
    fence: Fence | None = None
    finished: bool = False
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    layers_queued: int = 0

    @property
    def num_layers(self) -> int:
        return self.paged.num_layers if self.paged is not None else 0

    @property
    def nbytes(self) -> int:
        """Bytes this copy moves (its granted chunks, every layer)."""
        return len(self.grant.chunks) * self.chunk_bytes if self.grant is not None else 0

    @property
    def chunk_size(self) -> int:
        return self.books.chunk_size

    def ready(self) -> bool:
        """Whether :meth:`finish` would return without waiting for the device."""
        return self.fence is None or self.fence.done()

    def map_parts(self, slots: torch.Tensor, chunks: Sequence[int]) -> None:
        """``parts``: chunk ``chunks[i]`` with the grant's slot ``i``, grouped by arena (one copy
        call each). If mapping an arena fails, the grant is given back first."""
        grant, cs = self.grant, self.chunk_size
        try:
            for dev, where in grant.by_device().items():
                arena = self.books.arena(dev, self.paged.device)
                offsets = torch.tensor([grant.offsets[i] for i in where], dtype=torch.int64)
                self.parts.append((arena, chunk_slots(slots, [chunks[i] for i in where], cs), offsets))
        except BaseException:
            self.finished = True
            self._give_back()
            raise

    def queue_layers(self, stop: int | None = None, *, sm_budget: int | None = None) -> Fence | None:
        """Queue layers ``[layers_queued, stop)`` (``stop`` None: every layer left) of every chunk
        and fence them; returns that fence (None: nothing to copy)."""
        if self.finished:
            raise ValueError(f"this {self.op} was finished already")
        if self.grant is None:
            return None
        stop = self.num_layers if stop is None else stop
        if not isinstance(stop, int) or not self.layers_queued < stop <= self.num_layers:
            raise ValueError(f"stop {stop!r} must be in ({self.layers_queued}, {self.num_layers}] "
                             f"(layers [0, {self.layers_queued}) are queued already)")
        op = pack if self.op == "store" else unpack
        layers = None if (self.layers_queued, stop) == (0, self.num_layers) else (self.layers_queued, stop)
        try:
            with fenced_on_error(self.paged.device):
                for arena, slots, offsets in self.parts:
                    op(self.paged, slots, arena, offsets, chunk_size=self.chunk_size,
                       backend=self.backend, layers=layers, sm_budget=sm_budget)
        except BaseException:
            self.finished = True
            self._give_back()
            raise
        self.layers_queued = stop
        self.fence = Fence(self.paged.device)
        return self.fence

    def abort(self) -> None:
        """Give the grant back without completing the copy (a store commits nothing; a retrieve
        releases its shares and pins, its pages' bytes are not to be used), after waiting for
        whatever was queued. Once, instead of :meth:`finish`."""
        if self.finished:
            raise ValueError(f"this {self.op} was finished already")
        self.finished = True
        if self.grant is None:
            return
        if self.fence is not None:
            self.fence.wait()
        self._give_back()

    def finish(self) -> int:
        """Wait for the fence, then commit (store) or release (retrieve) the grant; returns the
        tokens stored / retrieved. Once, once every layer is queued."""
        if self.finished:
            raise ValueError(f"this {self.op} was finished already")
        if self.grant is not None and self.layers_queued != self.num_layers:
            raise ValueError(f"this {self.op} has queued {self.layers_queued} of {self.num_layers} "
                             "layers: copy_layers() the rest, or abort() it")
        self.finished = True
        if self.grant is None:
            return self.tokens
        try:
            self.fence.wait()
        except BaseException:
            log.error("a gpukv %s failed on the device: its slots stay out of circulation until "
                      "the server's lease on them expires", self.op)
            raise
        cs = self.chunk_size
        if self.op == "store":
            tokens = self.books.end_store(self.grant, ok=True) * cs
            moved = tokens // cs
        else:
            self.books.end_retrieve(self.grant)
            tokens, moved = self.tokens, len(self.grant.chunks)
        seconds = time.perf_counter() - self.t0
        if self.on_finish is not None:
            self.on_finish(self.op, seconds)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: %d tokens in %.3f s (%.2f GB/s)", self.op, moved * cs, seconds,
                      moved * self.chunk_bytes / max(seconds, 1e-9) / 1e9)
        return tokens

    def _give_back(self) -> None:
        """Return a grant whose copy will not complete (the caller waited for what it queued)."""
        try:
            if self.op == "store":
                self.books.end_store(self.grant, ok=False)
            else:
                self.books.end_retrieve(self.grant)
        except Exception as exc:  # the books are unreachable: their lease reclaims the slots
            log.warning("gpukv: could not give back the slots of a failed copy: %s", exc)
