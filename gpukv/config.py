"""Engine configuration: one dataclass, validated once, passed down."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


REMOTE_SCHEMES = ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://",
                  "valkey://", "valkeys://", "valkey+cluster://")


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(slots=True)
class EngineConfig:
    """Settings of a :class:`gpukv.CacheEngine`.

    capacity_bytes       L1 budget (one arena on ``device``).
    device               ``None`` = auto (``cuda`` when present, else ``cpu``).
    chunk_size           tokens per stored chunk (only full chunks are stored).
    disk_dir             folder of the safetensors disk tier (``None`` = no disk tier).
    disk_capacity_bytes  LRU budget of the disk tier (``None`` = unbounded).
    remote_url           ``redis://`` / ``rediss://`` URL of a shared Redis/Valkey tier.
    remote_timeout_s     the longest any call may wait on the remote tier.
    read_lease_s         lease of reader shares taken by a lookup.
    write_lease_s        lease of an unfinished write.
    salt                 tenant salt: seeds the hash chain and tags every key.
    backend              copy backend forced for pack/unpack (``None`` = auto).
    """

    capacity_bytes: int = 1 << 30
    device: str | None = None
    chunk_size: int = 256
    disk_dir: str | os.PathLike | None = None
    disk_capacity_bytes: int | None = None
    remote_url: str | None = None
    remote_timeout_s: float = 0.5
    read_lease_s: float = 300.0
    write_lease_s: float = 600.0
    salt: str = ""
    backend: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.capacity_bytes, int) or self.capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be a positive int, got {self.capacity_bytes!r}")
        if not isinstance(self.chunk_size, int) or self.chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive int, got {self.chunk_size!r}")
        if self.device is None:
            self.device = default_device()
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device {self.device!r} is not a torch device: {exc}") from None
        if self.disk_capacity_bytes is not None and (
            not isinstance(self.disk_capacity_bytes, int) or self.disk_capacity_bytes <= 0
        ):
            raise ValueError(
                f"disk_capacity_bytes must be a positive int or None, got {self.disk_capacity_bytes!r}"
            )
        if self.disk_capacity_bytes is not None and self.disk_dir is None:
            raise ValueError("disk_capacity_bytes is set but disk_dir is None")
        if self.remote_url is not None and not str(self.remote_url).startswith(REMOTE_SCHEMES):
            raise ValueError(f"remote_url must start with one of {', '.join(REMOTE_SCHEMES)}; "
                             f"got {self.remote_url!r}")
        for name in ("remote_timeout_s", "read_lease_s", "write_lease_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if self.backend not in (None, "triton", "torch", "ref"):
            raise ValueError(f"backend must be None, 'triton', 'torch' or 'ref', got {self.backend!r}")
        if not isinstance(self.salt, str):
            raise ValueError(f"salt must be a str, got {type(self.salt).__name__}")
