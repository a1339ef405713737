"""``ServerConfig``: the settings of the ``gpukv serve`` front end (the books have their own
:class:`gpukv.EngineConfig`), validated when made."""

from __future__ import annotations

from dataclasses import dataclass, field

from gpukv.frontend import protocol as p
from gpukv.frontend.peer import check_address
from gpukv.frontend.session import Limits


@dataclass(slots=True)
class ServerConfig:
    """Front-end settings (the books have their own :class:`gpukv.EngineConfig`)."""

    address: str = field(default_factory=p.default_address)
    worker_timeout_s: float = 30.0
    threads: int = 4
    allow_remote: bool = False
    allow_abstract: bool = False
    max_pending: int = 64  # requests of one session waiting in the pool
    max_pending_bytes: int = 32 << 20  # and their frames' bytes (one request always fits)
    limits: Limits = field(default_factory=Limits)
    orphan_hold_s: float = 600.0  # a reaped session's plans, when its processes are unknown
    key_file: str | None = None  # tcp:// only: the CURVE keys (default gpukv.curve_keys.key_file)
    check_holes: bool = True  # chunks punched out of a CPU arena (gpukv.frontend.holes)

    def __post_init__(self) -> None:
        check_address(self.address, allow_remote=self.allow_remote,
                      allow_abstract=self.allow_abstract)
        if not isinstance(self.worker_timeout_s, (int, float)) or self.worker_timeout_s <= 0:
            raise ValueError(f"worker_timeout_s must be positive, got {self.worker_timeout_s!r}")
        if not isinstance(self.orphan_hold_s, (int, float)) or self.orphan_hold_s < 0:
            raise ValueError(f"orphan_hold_s must be >= 0, got {self.orphan_hold_s!r}")
        if not isinstance(self.threads, int) or not 1 <= self.threads <= 256:
            raise ValueError(f"threads must be an int in [1, 256], got {self.threads!r}")
