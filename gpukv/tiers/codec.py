"""Self-describing chunk values shared by the disk and remote tiers.

A stored chunk is a safetensors blob with one uint8 tensor ``"chunk"`` (the chunk bytes in the
chunk format ``[num_layers, num_kv, chunk_size, row_bytes]``, flattened) and string metadata:

    gpukv_version   format version of this codec (``FORMAT_VERSION``)
    key             the object key string (``ObjectKey.to_str()``)
    fingerprint     the layout fingerprint (model, kind, dims, dtype, row bytes, chunk size)
    nbytes          payload length
    checksum        ``xxh3-128:<hex>`` of the payload (xxHash: much faster than blake2b, and a
                    checksum here guards against corruption, not against an adversary)

``decode`` returns ``None`` (a miss) for anything truncated, corrupted or foreign; callers log and
drop such values, they never reach a worker's pages.
"""

from __future__ import annotations

import io
import json
import struct
from typing import BinaryIO

import torch
import xxhash
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

FORMAT_VERSION = "1"
MAX_HEADER_BYTES = 1 << 20  # a gpukv header is a few hundred bytes


def checksum(payload: torch.Tensor) -> str:
    """``xxh3-128:<hex>`` of a contiguous CPU uint8 tensor's bytes."""
    assert payload.dtype == torch.uint8 and payload.device.type == "cpu"
    return "xxh3-128:" + xxhash.xxh3_128_hexdigest(payload.numpy().data)


def make_header(key: str, fingerprint: str, payload: torch.Tensor) -> dict[str, str]:
    return {
        "gpukv_version": FORMAT_VERSION,
        "key": key,
        "fingerprint": fingerprint,
        "nbytes": str(payload.numel()),
        "checksum": checksum(payload),
    }


def encode(key: str, fingerprint: str, payload: torch.Tensor) -> bytes:
    """Serialize one chunk (a contiguous CPU uint8 tensor) into a self-describing blob."""
    if payload.dtype != torch.uint8 or payload.device.type != "cpu" or payload.dim() != 1:
        raise ValueError(
            f"payload must be a 1-D CPU uint8 tensor, got {tuple(payload.shape)} "
            f"{payload.dtype} on {payload.device}"
        )
    payload = payload.contiguous()
    return st_save({"chunk": payload}, metadata=make_header(key, fingerprint, payload))


def decode(blob: bytes, key: str, fingerprint: str, nbytes: int) -> tuple[torch.Tensor | None, str]:
    """Check and unpack a blob. Returns ``(payload, "")`` or ``(None, reason)`` on any mismatch."""
    try:
        tensors = st_load(blob)
        meta = _read_metadata(blob)
    except Exception as exc:  # safetensors raises several types for malformed input
        return None, f"unreadable value ({type(exc).__name__}: {exc})"
    return check(tensors.get("chunk"), meta, key, fingerprint, nbytes)


def check(
    payload: torch.Tensor | None, meta: dict[str, str], key: str, fingerprint: str, nbytes: int
) -> tuple[torch.Tensor | None, str]:
    """Validate a decoded payload and its metadata against what the caller expects."""
    if payload is None or payload.dtype != torch.uint8 or payload.dim() != 1:
        return None, "no uint8 'chunk' tensor"
    if meta.get("gpukv_version") != FORMAT_VERSION:
        return None, f"format version {meta.get('gpukv_version')!r} != {FORMAT_VERSION!r}"
    if meta.get("key") != key:
        return None, f"key {meta.get('key')!r} != expected {key!r}"
    if meta.get("fingerprint") != fingerprint:
        return None, "layout fingerprint differs (foreign value)"
    if payload.numel() != nbytes or meta.get("nbytes") != str(nbytes):
        return None, f"size {payload.numel()} != expected {nbytes}"
    if meta.get("checksum") != checksum(payload):
        return None, "checksum mismatch (corrupted value)"
    return payload, ""


def read_metadata(f: BinaryIO) -> dict[str, str]:
    """The string metadata of the blob ``f`` reads from, reading only its header.

    Raises ``ValueError`` for a truncated or malformed header (``OSError`` from ``f`` passes).
    """
    head = f.read(8)
    if len(head) != 8:
        raise ValueError("truncated header")
    (header_len,) = struct.unpack("<Q", head)
    if header_len > MAX_HEADER_BYTES:
        raise ValueError(f"header of {header_len} bytes (> {MAX_HEADER_BYTES})")
    raw = f.read(header_len)
    if len(raw) != header_len:
        raise ValueError("truncated header")
    header = json.loads(raw)  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise ValueError("no metadata in the header")
    return meta


def _read_metadata(blob: bytes) -> dict[str, str]:
    return read_metadata(io.BytesIO(blob))
