"""The ``GET /status`` document: msgspec Structs (the source of truth) and the JSON schema
generated from them, shipped beside this file as ``status.schema.json`` for other tools.

Example (JSON)::

    {"version": "0.1.0", "uptime_s": 12.5, "chunk_size": 256,
     "devices": [{"name": "cuda:0", "capacity_bytes": 1073741824, "used_bytes": 4194304,
                  "objects": 16, "read_locked_objects": 2}],
     "models": [{"name": "llama", "kind": "mha", "instances": [
                  {"instance_id": "w0", "tp_rank": 0, "tp_size": 1, "device": "cuda:0"}]}],
     "clients": 1, "open_requests": 3,
     "tiers": [{"name": "L1", "healthy": true, "detail": ""},
               {"name": "disk", "healthy": true, "detail": "/var/cache/gpukv"}]}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import msgspec

SCHEMA_PATH = Path(__file__).with_name("status.schema.json")
NonNegative = Annotated[int, msgspec.Meta(ge=0)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class DeviceStatus(msgspec.Struct, forbid_unknown_fields=True):
    """One L1 arena."""

    name: Name  # torch device string, e.g. "cuda:0" or "cpu"
    capacity_bytes: NonNegative
    used_bytes: NonNegative
    objects: NonNegative
    read_locked_objects: NonNegative


class InstanceStatus(msgspec.Struct, forbid_unknown_fields=True):
    """One registered worker instance (one TP rank of one engine)."""

    instance_id: Name
    tp_rank: NonNegative
    tp_size: Annotated[int, msgspec.Meta(ge=1)]
    device: Name


class ModelStatus(msgspec.Struct, forbid_unknown_fields=True):
    """One registered model and its instances."""

    name: Name
    kind: Literal["mha", "mla"]
    instances: list[InstanceStatus]


class TierStatus(msgspec.Struct, forbid_unknown_fields=True):
    """One tier; ``detail`` says why it is unhealthy (or where it lives), never a secret."""

    name: Literal["L1", "disk", "remote"]
    healthy: bool
    detail: Annotated[str, msgspec.Meta(max_length=1024)] = ""


class Status(msgspec.Struct, forbid_unknown_fields=True):
    """The whole ``GET /status`` document."""

    version: Name
    uptime_s: Annotated[float, msgspec.Meta(ge=0)]
    chunk_size: Annotated[int, msgspec.Meta(ge=1)]
    devices: list[DeviceStatus]
    models: list[ModelStatus]
    clients: NonNegative  # connected client sessions (0 for the embedded engine)
    open_requests: NonNegative
    tiers: list[TierStatus]


def as_status(document: Status | dict) -> Status:
    """``document`` as a validated :class:`Status` (a dict is converted); ``ValueError`` naming
    the offending field otherwise."""
    if isinstance(document, Status):
        return document
    if not isinstance(document, dict):
        raise TypeError(f"status must be a Status or a dict, got {type(document).__name__}")
    try:
        return msgspec.convert(document, Status)
    except msgspec.ValidationError as exc:
        raise ValueError(f"invalid status document: {exc}") from None


def encode_status(document: Status | dict) -> bytes:
    """JSON bytes of a validated status document."""
    return msgspec.json.encode(as_status(document))


def json_schema() -> dict:
    """The JSON schema of :class:`Status` (what ``status.schema.json`` holds)."""
    return msgspec.json.schema(Status)


def write_schema(path: str | Path = SCHEMA_PATH) -> Path:
    """Regenerate ``status.schema.json`` (run after changing the Structs; a test checks it)."""
    path = Path(path)
    path.write_text(json.dumps(json_schema(), indent=2, sort_keys=True) + "\n")
    return path


if __name__ == "__main__":
    print(write_schema())
