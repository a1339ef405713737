"""One client session of ``gpukv serve``: its scoped ids, its bounds and its state.

See :mod:`gpukv.frontend.handlers` for what the requests do with them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Hashable, NamedTuple

from gpukv.frontend.liveness import Peers

if TYPE_CHECKING:  # (annotations only: the CLI reads Limits without importing torch)
    from gpukv.engine.core import RetrievePlan, StorePlan


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
    """Bounds per session; past one, a request gets a ``Busy`` error reply and changes nothing."""

    max_instances: int = 256
    max_open_requests: int = 1 << 14
    max_plans: int = 1024
    max_reserved_bytes: int | None = None  # default: half of one device's arena

    def __post_init__(self) -> None:
        for name in ("max_instances", "max_open_requests", "max_plans", "max_reserved_bytes"):
            value = getattr(self, name)
            if name == "max_reserved_bytes" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass(slots=True)
class Session:
    """A session's books: what it registered and opened, and its plans in flight."""

    sid: str
    group: str
    last_seen: float
    peers: Peers = field(default_factory=Peers)  # its processes, as the server observed them
    instances: dict[Hashable, Scoped] = field(default_factory=dict)
    requests: set[Scoped] = field(default_factory=set)  # requests this session opened
    plans: dict[int, StorePlan | RetrievePlan] = field(default_factory=dict)
    reserved_bytes: int = 0
    closed: bool = False  # reaped: a handler still running adds nothing to it
