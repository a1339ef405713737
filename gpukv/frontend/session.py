"""One client session of ``gpukv serve``: its scoped ids, its bounds, its state and its client.

See :mod:`gpukv.frontend.handlers` for what the requests do with them.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Hashable, NamedTuple

from gpukv.frontend.liveness import Peers

if TYPE_CHECKING:  # (annotations only: the CLI reads Limits without importing torch)
    from gpukv.engine.grants import ReadGrant, WriteGrant


class Scoped(NamedTuple):
    """A client's id inside its session or group; prints as the client's id alone.

    A tuple, so that hashing and comparing it (per key in the L1's share loops: it is the owner
    of a request's shares) run in C, not in a dataclass's Python ``__hash__``/``__eq__``. Every
    owner a server's books hold is a Scoped or a
    :class:`gpukv.engine.registry.InternalOwner`, never a bare tuple."""

    scope: str
    ident: Hashable

    def __repr__(self) -> str:
        return repr(self.ident)


@dataclass(slots=True)
class Limits:
    """Bounds on what clients may hold; past one, a request gets a ``Busy`` error reply and
    changes nothing. Per session: instances, open requests, plans in flight. Per client process
    (all its sessions together; a session whose process the server cannot tell is its own
    client): bytes reserved for stores in flight (stores not committed, and those of its reaped
    sessions still held) and sessions. Server-wide: sessions."""

    max_instances: int = 256
    max_open_requests: int = 1 << 14
    max_plans: int = 1024
    max_reserved_bytes: int | None = None  # per process; default: half of one device's arena
    max_sessions: int = 4096
    max_sessions_per_process: int = 256

    def __post_init__(self) -> None:
        for name in ("max_instances", "max_open_requests", "max_plans", "max_reserved_bytes",
                     "max_sessions", "max_sessions_per_process"):
            value = getattr(self, name)
            if name == "max_reserved_bytes" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass(slots=True, eq=False)
class Client:
    """What the sessions of one client process hold together (its fair-share unit): ``key`` is
    the process as the server observed it, or the session id where it could not tell."""

    key: Hashable
    sessions: OrderedDict = field(default_factory=OrderedDict)  # sid -> None, least recent first
    reserved_bytes: int = 0  # stores in flight, its reaped sessions' still held ones included


@dataclass(slots=True, eq=False)
class Session:
    """A session's books: what it registered and opened, and its plans in flight."""

    sid: str
    group: str
    last_seen: float
    client: Client
    peers: Peers = field(default_factory=Peers)  # its processes, as the server observed them
    instances: dict[Hashable, Scoped] = field(default_factory=dict)
    requests: dict[Scoped, None] = field(default_factory=dict)  # it opened them, oldest first
    plans: dict[int, WriteGrant | ReadGrant] = field(default_factory=dict)
    reserved_bytes: int = 0
    active: int = 0  # requests being handled now
    closed: bool = False  # reaped: a handler still running adds nothing to it

    @property
    def empty(self) -> bool:
        """Holds nothing and runs nothing: closing it loses nothing of its client's."""
        return not (self.instances or self.requests or self.plans or self.active)
