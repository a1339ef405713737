"""What a vLLM engine told the server about its chunks: per logical chunk (a *unit*), the vLLM
blocks it holds, kept in a bounded table for :class:`gpukv.ops.router_events.RouterEvents`.

A unit is one gpukv chunk as a vLLM engine sees it: key ``(models, tp_size, chunk_hash)`` --
the model key of each pipeline stage and the TP size name which objects must be held for an
engine to load the chunk (every stage's, every KV rank's: :meth:`RouterEvents._evaluate`). It
carries what vLLM's ``BlockStored`` needs: the blocks' hashes (vLLM's own), the parent block's
hash, the token ids (packed), the block size, LoRA, extra keys, the KV cache group; and which
tiers it is announced in (a bit per tier) and which engine group announces it to its own vLLM.

Bounds: at most ``max_units`` units (each about ``4 * chunk_size`` bytes of token ids plus its
block hashes). A unit announced in some tier stays (its removal must be
published with the same hashes); a unit announced nowhere is dropped oldest first when room is
needed. With every unit announced, a new description is refused (counted): that chunk is then
not announced, a missed routing hint, never a false one.
"""

from __future__ import annotations

import collections
from array import array
from dataclasses import dataclass
from typing import Any

from gpukv.ops import vllm_wire as w

UnitKey = tuple[tuple[str, ...], int, bytes]  # (model key per stage, tp_size, chunk hash)
TIER_BITS = {"L1": 1, "disk": 2, "remote": 4}
MEDIUM_PREFIX = "gpukv:"


@dataclass(slots=True, eq=False)
class Unit:
    key: UnitKey
    block_hashes: tuple
    parent: bytes | int | None
    token_ids: array
    block_size: int
    lora_id: int | None = None
    lora_name: str | None = None
    extra_keys: list | None = None
    group_idx: int = 0
    spec_kind: str | None = None
    owner: str | None = None  # the engine group that republishes it (take_events), if any
    announced: int = 0  # TIER_BITS of the tiers it is announced in

    def stored(self, tier: str) -> bytes:
        """The encoded ``BlockStored`` of this unit in ``tier``."""
        extra = None if self.extra_keys is None else [None if k is None else tuple(k)
                                                      for k in self.extra_keys]
        return w.encode(w.BlockStored(
            block_hashes=list(self.block_hashes), parent_block_hash=self.parent,
            token_ids=self.token_ids.tolist(), block_size=self.block_size, lora_id=self.lora_id,
            medium=MEDIUM_PREFIX + tier, lora_name=self.lora_name, extra_keys=extra,
            group_idx=self.group_idx, kv_cache_spec_kind=self.spec_kind))

    def removed(self, tier: str) -> bytes:
        """The encoded ``BlockRemoved`` of this unit in ``tier``."""
        return w.encode(w.BlockRemoved(block_hashes=list(self.block_hashes),
                                       medium=MEDIUM_PREFIX + tier, group_idx=self.group_idx))


def check_chunk(i: int, chunk: Any, block_size: int, chunk_size: int) -> None:
    """ValueError naming what does not fit in the ``i``-th ``ChunkBlocks`` of a description."""
    if len(chunk.token_ids) != chunk_size:
        raise ValueError(f"chunks[{i}] has {len(chunk.token_ids)} token ids, the chunk size is "
                         f"{chunk_size}")
    if len(chunk.block_hashes) * block_size != chunk_size:
        raise ValueError(f"chunks[{i}] has {len(chunk.block_hashes)} block hashes of block size "
                         f"{block_size}, which is not the chunk size {chunk_size}")
    if chunk.extra_keys is not None and len(chunk.extra_keys) != len(chunk.block_hashes):
        raise ValueError(f"chunks[{i}] has {len(chunk.extra_keys)} extra keys for "
                         f"{len(chunk.block_hashes)} blocks")
    for h in (*chunk.block_hashes, chunk.parent):
        if isinstance(h, int) and not 0 <= h < 1 << 64:
            raise ValueError(f"chunks[{i}] has the block hash {h}, not a 64-bit unsigned int")


def make_unit(key: UnitKey, chunk: Any, header: Any, owner: str | None) -> Unit:
    """A unit from one validated ``ChunkBlocks`` and its ``VllmBlocks`` header."""
    tokens = chunk.token_ids
    packed = array("i", tokens) if max(tokens) < 1 << 31 else array("q", tokens)  # vocab ids: int32
    return Unit(key, tuple(chunk.block_hashes), chunk.parent, packed,
                header.block_size, header.lora_id, header.lora_name, chunk.extra_keys,
                header.group_idx, header.spec_kind, owner)


class UnitTable:
    """Units by key and by object ``(model, chunk_hash)``, bounded (see the module docstring).
    Not thread-safe: one thread (the translator's) owns it."""

    def __init__(self, max_units: int) -> None:
        if isinstance(max_units, bool) or not isinstance(max_units, int) or max_units < 1:
            raise ValueError(f"max_units must be an int >= 1, got {max_units!r}")
        self.max_units = max_units
        self.units: dict[UnitKey, Unit] = {}
        self.by_object: dict[tuple[str, bytes], list[Unit]] = {}
        self._idle: collections.OrderedDict[UnitKey, None] = collections.OrderedDict()
        self.refused = 0  # descriptions not kept: every unit was announced somewhere
        self.dropped = 0  # idle units dropped to make room

    def __len__(self) -> int:
        return len(self.units)

    def get(self, key: UnitKey) -> Unit | None:
        return self.units.get(key)

    def add(self, unit: Unit) -> bool:
        """Keep ``unit`` (announced nowhere yet); False when there is no room."""
        if len(self.units) >= self.max_units:
            if not self._idle:
                self.refused += 1
                return False
            self._drop(self._idle.popitem(last=False)[0])
        self.units[unit.key] = unit
        self._idle[unit.key] = None
        models, _tp, chunk_hash = unit.key
        for model in set(models):
            self.by_object.setdefault((model, chunk_hash), []).append(unit)
        return True

    def touch(self, unit: Unit) -> None:
        """Described again: an idle unit is the newest."""
        if unit.key in self._idle:
            self._idle.move_to_end(unit.key)

    def set_announced(self, unit: Unit, mask: int) -> None:
        if bool(mask) != bool(unit.announced):
            if mask:
                self._idle.pop(unit.key, None)
            else:
                self._idle[unit.key] = None
        unit.announced = mask

    def clear(self) -> None:
        self.units.clear()
        self.by_object.clear()
        self._idle.clear()

    def _drop(self, key: UnitKey) -> None:
        unit = self.units.pop(key)
        models, _tp, chunk_hash = key
        for model in set(models):
            units = self.by_object.get((model, chunk_hash), [])
            units[:] = [u for u in units if u is not unit]
            if not units:
                self.by_object.pop((model, chunk_hash), None)
        self.dropped += 1
