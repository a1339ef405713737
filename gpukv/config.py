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

    capacity_bytes       L1 budget of each device's arena.
    device               ``None`` = auto (``cuda`` when present, else ``cpu``).
    devices              arenas to create, e.g. ``("cuda:0", "cuda:1")`` (``None`` = ``(device,)``);
                         ``"cpu:0", "cpu:1"`` make several CPU arenas that stand for devices.
    chunk_size           tokens per stored chunk (only full chunks are stored).
    disk_dir             folder of the safetensors disk tier (``None`` = no disk tier).
    disk_capacity_bytes  LRU budget of the disk tier (``None`` = unbounded).
    remote_url           ``redis://`` / ``rediss://`` URL of a shared Redis/Valkey tier.
    remote_timeout_s     the longest any call may wait on the remote tier.
    read_lease_s         lease of reader shares taken by a lookup.
    write_lease_s        lease of an unfinished write.
    salt                 tenant salt: seeds the hash chain and tags every key.
    backend              copy backend forced for pack/unpack (``None`` = auto).
    max_requests         open requests (looked up, not ended) the engine keeps at most.
    max_keys_per_request chunk hashes x ranks one call may name (bounds one call's work).
    prefault             touch the arenas' pages when they are created, so the first stores do
                         not pay a page fault per 4 KiB (costs a zero fill of the capacity):
                         True (before the engine returns), "background" (a thread), False.
    metrics              keep Prometheus metrics (``CacheCore.observer.metrics``; cost: perf/sweep_metrics.py).
    events_address       publish KV events on a ZMQ PUB socket there (ipc:// or loopback tcp://).
    events_buffer        keep up to this many KV events in process for ``take_events`` (0 = off).
    vllm_events_address  publish what the cache holds as vLLM blocks, in vLLM's KV-event wire
                         format, on a ZMQ PUB socket there (:mod:`gpukv.ops.router_events`).
    vllm_events_topic    the topic frame of those messages.
    vllm_events_units    the most chunk descriptions (vLLM block hashes, tokens) kept for them.
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
    devices: tuple[str, ...] | None = None
    max_requests: int = 1 << 16
    max_keys_per_request: int = 1 << 17
    prefault: bool | str = True
    metrics: bool = True
    events_address: str | None = None
    events_buffer: int = 0
    vllm_events_address: str | None = None
    vllm_events_topic: str = ""
    vllm_events_units: int = 1 << 16

    def __post_init__(self) -> None:
        if isinstance(self.capacity_bytes, bool) or not isinstance(self.capacity_bytes, int) \
                or self.capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be a positive int, got {self.capacity_bytes!r}")
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) \
                or self.chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive int, got {self.chunk_size!r}")
        if self.device is None:
            self.device = default_device() if not self.devices else self.devices[0]
        if self.devices is None:
            self.devices = (self.device,)
        self.devices = tuple(self.devices)
        for name in (self.device, *self.devices):
            try:
                torch.device(name)
            except (RuntimeError, TypeError) as exc:
                raise ValueError(f"device {name!r} is not a torch device: {exc}") from None
        if not self.devices or len(set(self.devices)) != len(self.devices):
            raise ValueError(f"devices must be distinct and non-empty, got {self.devices!r}")
        if self.prefault not in (True, False, "background"):
            raise ValueError(f"prefault must be True, False or 'background', got {self.prefault!r}")
        if isinstance(self.events_buffer, bool) or not isinstance(self.events_buffer, int) \
                or self.events_buffer < 0:
            raise ValueError(f"events_buffer must be an int >= 0, got {self.events_buffer!r}")
        for name in ("max_requests", "max_keys_per_request"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
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
        if isinstance(self.vllm_events_units, bool) or not isinstance(self.vllm_events_units, int) \
                or self.vllm_events_units < 1:
            raise ValueError(f"vllm_events_units must be an int >= 1, got {self.vllm_events_units!r}")
        if not isinstance(self.vllm_events_topic, str):
            raise ValueError(f"vllm_events_topic must be a str, got {self.vllm_events_topic!r}")
        if not isinstance(self.salt, str):
            raise ValueError(f"salt must be a str, got {type(self.salt).__name__}")
