"""Stable chained chunk hashes and object keys.

``h_i = blake2b(h_{i-1} || tokens of chunk i)`` over full chunks only, seeded by ``seed`` (a tenant
salt gives a disjoint hash chain). Tokens are hashed as little-endian int64, so the same token ids
give the same hashes in every process and on every machine (never Python's ``hash()``).
"""

from __future__ import annotations

import array
import hashlib
import sys
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch

from gpukv.constants import HASH_BYTES  # noqa: E402
_LITTLE = sys.byteorder == "little"

TokenIds = Union[Sequence[int], np.ndarray, torch.Tensor]


def as_token_array(token_ids: TokenIds) -> np.ndarray:
    """Token ids as a contiguous little-endian int64 numpy array (1-D)."""
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dim() != 1 or token_ids.is_floating_point() or token_ids.is_complex():
            raise ValueError(
                f"token_ids must be a 1-D integer tensor, got shape {tuple(token_ids.shape)} "
                f"dtype {token_ids.dtype}"
            )
        arr = token_ids.detach().to("cpu", torch.int64).numpy()
    elif isinstance(token_ids, (list, tuple)):
        try:  # array('q') converts a list of ints ~2x faster than numpy's type inference
            return np.frombuffer(array.array("q", token_ids), dtype="<i8") if _LITTLE else \
                np.array(token_ids, dtype="<i8")
        except (TypeError, OverflowError):
            raise ValueError(f"token_ids must be a 1-D sequence of int64 integers, got "
                             f"{str(token_ids)[:60]!r}") from None
    else:
        arr = np.asarray(token_ids)
        if arr.size == 0:
            arr = arr.astype(np.int64)
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise ValueError(
                f"token_ids must be a 1-D sequence of integers, got shape {arr.shape} dtype {arr.dtype}"
            )
    return np.ascontiguousarray(arr, dtype="<i8")


def chunk_hashes(token_ids: TokenIds, chunk_size: int = 256, *, seed: bytes = b"") -> list[bytes]:
    """Chained 16-byte hashes of the full ``chunk_size``-token chunks of ``token_ids``.

    A trailing partial chunk gets no hash. ``seed`` starts the chain (tenant isolation).
    """
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if not isinstance(seed, (bytes, bytearray)):
        raise ValueError(f"seed must be bytes, got {type(seed).__name__}")
    arr = as_token_array(token_ids)
    num_chunks = len(arr) // chunk_size
    prev = hashlib.blake2b(b"gpukv-chunk-chain\x00" + bytes(seed), digest_size=HASH_BYTES).digest()
    out = []
    view = memoryview(arr[: num_chunks * chunk_size]).cast("B")
    step = chunk_size * 8
    for i in range(num_chunks):
        h = hashlib.blake2b(prev, digest_size=HASH_BYTES)
        h.update(view[i * step : (i + 1) * step])
        prev = h.digest()
        out.append(prev)
    return out


@dataclass(frozen=True, slots=True)
class ObjectKey:
    """Key of one stored chunk.

    ``kv_rank`` is the TP rank for MHA shards and 0 for MLA, whose latent is the same on every TP
    rank (one object serves the whole TP group). ``salt`` isolates tenants.
    """

    model: str
    kv_rank: int
    chunk_hash: bytes
    salt: str = ""

    def to_str(self) -> str:
        """Stable text form used by the disk and remote tiers."""
        base = f"{self.model}/{self.kv_rank}/{self.chunk_hash.hex()}"
        return f"{base}/{self.salt}" if self.salt else base
