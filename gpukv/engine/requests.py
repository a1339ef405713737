"""Open requests: what each one looked up, so it can be topped up, freed by range, and ended.

A request is opened by its first lookup and lives until ``end`` (END_SESSION), or until its read
lease passes with no new lookup (then ``prune`` forgets it; its shares expired with the lease).
The table is bounded: a new request past ``max_requests`` is refused with :class:`Busy` (never
by dropping another caller's request).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Hashable

from gpukv.engine.keys import KeySpace
from gpukv.errors import Busy

__all__ = ["Busy", "Request", "RequestTable"]


@dataclass(slots=True)
class Request:
    owner: Hashable  # the L1 owner of its shares
    model: str
    spaces: list[KeySpace]  # the ranks it looked up
    hashes: list[bytes] = field(default_factory=list)  # the longest prefix it looked up
    deadline: float = 0.0
    creator: Hashable = None  # the session that opened it (server), None embedded

    def keys(self, start: int = 0, end: int | None = None) -> list[bytes]:
        """L1 keys of chunks ``start:end`` of every rank it looked up."""
        hashes = self.hashes[start:end]
        return [k for space in self.spaces for k in space.keys(hashes)]


class RequestTable:
    """Requests by owner, oldest deadline first. Thread-safe."""

    def __init__(self, max_requests: int) -> None:
        self.max_requests = max_requests
        self._lock = threading.Lock()
        self._requests: OrderedDict[Hashable, Request] = OrderedDict()

    def open(self, owner: Hashable, model: str, spaces: list[KeySpace], hashes: list[bytes], *,
             deadline: float, creator: Hashable = None) -> Request:
        """The request ``owner`` (created on its first lookup), its lease renewed and its looked
        up prefix extended to ``hashes`` when longer. Busy when the table is full; ValueError
        when the request looked up another model before."""
        with self._lock:
            req = self._requests.get(owner)
            if req is None:
                if len(self._requests) >= self.max_requests:
                    raise Busy(f"busy: {self.max_requests} requests are open; end some first")
                req = self._requests[owner] = Request(owner, model, spaces, creator=creator)
            elif req.model != model:
                raise ValueError(f"request {owner!r} looked up model {req.model!r} before, now "
                                 f"{model!r}: use one request id per model")
            if len(spaces) > len(req.spaces):
                req.spaces = spaces
            if len(hashes) > len(req.hashes) and hashes[:len(req.hashes)] == req.hashes:
                req.hashes = list(hashes)
            elif hashes[:len(req.hashes)] != req.hashes[:len(hashes)]:
                req.hashes = list(hashes)  # another prompt under the same id: follow the latest
            req.deadline = deadline
            self._requests.move_to_end(owner)
            return req

    def get(self, owner: Hashable) -> Request | None:
        with self._lock:
            return self._requests.get(owner)

    def pop(self, owner: Hashable) -> Request | None:
        with self._lock:
            return self._requests.pop(owner, None)

    def prune(self, now: float) -> list[Request]:
        """Forget every request whose lease passed; returns them."""
        out = []
        with self._lock:
            while self._requests:
                req = next(iter(self._requests.values()))
                if req.deadline > now:
                    break
                out.append(self._requests.pop(req.owner))
        return out

    def __len__(self) -> int:
        return len(self._requests)

    def __contains__(self, owner: Hashable) -> bool:
        with self._lock:
            return owner in self._requests
