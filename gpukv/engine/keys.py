"""Stable chained chunk hashes and object keys.

``h_i = xxh3_128(h_{i-1} || tokens of chunk i || extra_i)`` over full chunks only, started from
``xxh3_128(KEY_VERSION tag || seed)``: the same token ids give the same hashes in every process and
on every machine (never Python's ``hash()``). ``seed`` isolates what must never share KV although
the tokens agree (a tenant salt, a vLLM ``cache_salt``, a LoRA adapter); ``extras`` adds per-chunk
bytes (multimodal feature hashes overlapping the chunk). Tokens are hashed as little-endian int64.

xxh3-128 is much faster than blake2b and is a checksum, not a cryptographic hash: tenants that must not
be able to collide with each other's chunks on purpose need distinct secret salts.

An object key names one chunk of one *key space*: a model, its layout fingerprint and a KV rank
(the TP rank for MHA shards, 0 for MLA, whose latent is the same on every TP rank). In L1 a key is
``chunk_hash + space suffix`` (bytes: hashed and compared in C); in the disk and remote tiers it
is the text ``v2/<model>/<layout digest>/<kv_rank>/<hash hex>``. The ``v2`` marks the key format:
entries written under another format are misses, never errors.
"""

from __future__ import annotations

import struct
import sys
from collections import abc
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch
import xxhash

from gpukv.constants import HASH_BYTES

KEY_VERSION = 2
_CHAIN_TAG = b"gpukv-chunk-chain-v2\x00"
_LITTLE = sys.byteorder == "little"
_INT64_MAX = (1 << 63) - 1

TokenIds = Union[Sequence[int], np.ndarray, torch.Tensor]


def as_token_array(token_ids: TokenIds) -> np.ndarray:
    """Token ids as a contiguous little-endian int64 numpy array (1-D; read-only for a list or
    other sequence). Values outside int64 (e.g. 2**64 - 1) are a ValueError, never a silent wrap."""
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dim() != 1 or token_ids.is_floating_point() or token_ids.is_complex() \
                or token_ids.dtype == torch.bool:
            raise ValueError(f"token_ids must be a 1-D integer tensor, got shape "
                             f"{tuple(token_ids.shape)} dtype {token_ids.dtype}")
        if token_ids.dtype == torch.uint64 and token_ids.numel() and int(token_ids.max()) > _INT64_MAX:
            raise ValueError(f"token_ids hold {int(token_ids.max())}, past int64")
        return np.ascontiguousarray(token_ids.detach().to("cpu", torch.int64).numpy(), dtype="<i8")
    if isinstance(token_ids, (list, tuple, range)) or (
            isinstance(token_ids, abc.Sequence) and not isinstance(token_ids, (str, bytes, bytearray))):
        # any sequence of ints (vLLM's ConstantList too, which numpy would read item by item):
        # struct is strict (no floats, strings or wrap-around) and faster than array('q');
        # struct.pack(fmt, ...) is 25 % slower than a Struct's pack
        try:
            packed = struct.Struct(f"<{len(token_ids)}q").pack(*token_ids)
        except (struct.error, TypeError, ValueError, OverflowError):
            bad = next((t for t in token_ids if not _is_int64(t)), token_ids)
            raise ValueError(f"token_ids must be a 1-D sequence of int64 integers, got "
                             f"{str(bad)[:60]!r}") from None
        return np.frombuffer(packed, dtype="<i8")
    arr = np.asarray(token_ids)
    if arr.size == 0:
        arr = arr.astype(np.int64)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise ValueError(f"token_ids must be a 1-D sequence of integers, got shape {arr.shape} "
                         f"dtype {arr.dtype}")
    if arr.dtype == np.uint64 and arr.size and int(arr.max()) > _INT64_MAX:
        raise ValueError(f"token_ids hold {int(arr.max())}, past int64")
    return np.ascontiguousarray(arr, dtype="<i8")


def _is_int64(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) \
        and -_INT64_MAX - 1 <= int(value) <= _INT64_MAX


def chunk_hashes(token_ids: TokenIds, chunk_size: int = 256, *, seed: bytes = b"",
                 extras: Sequence[bytes | None] | None = None,
                 after: bytes | None = None) -> list[bytes]:
    """Chained 16-byte hashes of the full ``chunk_size``-token chunks of ``token_ids``.

    A trailing partial chunk gets no hash. ``seed`` starts the chain; ``extras[i]`` (bytes or
    None), if given, is mixed into chunk ``i``'s hash (it may be shorter than the chunk count).
    ``after``: the hash of the chunk before ``token_ids`` (its chain goes on from there: hashing
    a prompt's new chunks only gives what hashing the whole prompt gives for them; ``seed`` is
    then not used).
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if not isinstance(seed, (bytes, bytearray)):
        raise ValueError(f"seed must be bytes, got {type(seed).__name__}")
    if after is not None and (not isinstance(after, (bytes, bytearray)) or len(after) != HASH_BYTES):
        raise ValueError(f"after must be a {HASH_BYTES}-byte chunk hash, got {after!r:.60}")
    arr = as_token_array(token_ids)
    num_chunks = len(arr) // chunk_size
    prev = bytes(after) if after is not None else xxhash.xxh3_128_digest(_CHAIN_TAG + bytes(seed))
    if not num_chunks:
        return []
    view = memoryview(arr[: num_chunks * chunk_size]).cast("B")
    step, out = chunk_size * 8, []
    hasher = xxhash.xxh3_128
    extras = list(extras or ())
    for i in range(num_chunks):
        h = hasher(prev)
        h.update(view[i * step:(i + 1) * step])
        extra = extras[i] if i < len(extras) else None
        if extra:
            if not isinstance(extra, (bytes, bytearray)):
                raise ValueError(f"extras[{i}] must be bytes or None, got {type(extra).__name__}")
            h.update(struct.pack("<I", len(extra)))
            h.update(extra)
        prev = h.digest()
        out.append(prev)
    return out


def request_seed(*parts: str | bytes | None) -> bytes:
    """One seed from what makes a request's KV differ beyond its tokens (cache salt, LoRA
    adapter name, ...): each part length-prefixed, so ("ab", "c") != ("a", "bc"); None parts
    count as absent."""
    out = bytearray()
    for part in parts:
        data = b"" if part is None else part.encode() if isinstance(part, str) else bytes(part)
        out += struct.pack("<I", len(data)) + data
    return bytes(out) if any(p is not None for p in parts) else b""


@dataclass(frozen=True, slots=True)
class KeySpace:
    """The objects of one model layout and KV rank. ``suffix`` makes L1 keys of this space
    distinct from every other space's in one process (``ident`` is a process-local number)."""

    model: str
    layout: str  # short digest of the layout fingerprint
    kv_rank: int
    ident: int

    @property
    def suffix(self) -> bytes:
        return struct.pack("<I", self.ident)

    def keys(self, hashes: Sequence[bytes]) -> list[bytes]:
        """L1 keys of ``hashes`` in this space."""
        suffix = self.suffix
        return [h + suffix for h in hashes]

    def tier_key(self, l1_key: bytes) -> str:
        """The stable text form of an L1 key of this space, for the disk and remote tiers."""
        return f"v{KEY_VERSION}/{self.model}/{self.layout}/{self.kv_rank}/{l1_key[:HASH_BYTES].hex()}"


def parse_tier_key(text: str) -> tuple[str, str, int, bytes] | None:
    """``(model, layout, kv_rank, chunk_hash)`` of a tier key, or None for another format."""
    head, _, rest = text.partition("/")
    if head != f"v{KEY_VERSION}":
        return None
    try:
        model, layout, rank, digest = rest.rsplit("/", 3)
        return model, layout, int(rank), bytes.fromhex(digest)
    except ValueError:
        return None


def layout_digest(fingerprint: str) -> str:
    """12 hex characters naming a layout fingerprint in keys."""
    return xxhash.xxh3_64_hexdigest(fingerprint.encode())[:12]
