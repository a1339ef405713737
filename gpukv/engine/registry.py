"""Registered instances (one worker's paged cache each) and models, and their key spaces.

The books know a layout only by its description (``PagedKV.describe()``: plain ints and strings),
never by tensors: the server sizes chunks from it while the worker alone holds the pages. All
instances of one model share one layout fingerprint; a mismatch is refused at registration.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Hashable

from gpukv.constants import HASH_BYTES, MAX_READERS
from gpukv.engine.keys import KeySpace, layout_digest

MAX_CHUNK_BYTES = 1 << 31  # one chunk of one model shard: 2 GiB is far past any real model
_LAYOUT_INTS = ("num_layers", "num_kv", "num_heads", "head_bytes", "row_bytes")


@dataclass(frozen=True, slots=True)
class InternalOwner:
    """An owner of shares or writes that no client can name (clients name owners with str/int)."""

    role: str
    ident: Hashable = None


@dataclass(slots=True)
class Instance:
    instance_id: Hashable
    model: str
    kind: str
    tp_rank: int
    tp_size: int
    device: int  # arena index its stores go to
    space: KeySpace
    chunk_bytes: int
    layer_bytes: int
    num_layers: int
    writer: InternalOwner  # owner of its unfinished writes


@dataclass(slots=True)
class Model:
    """``shared``: one object serves every TP rank (an MLA cache registered shared); else each
    rank has its own objects (MHA shards, and MLA caches of ranks that cannot read each other's
    arenas: see :mod:`gpukv.l1.topology`)."""

    name: str
    kind: str
    fingerprint: str
    layout: str
    chunk_bytes: int
    shared: bool = False
    spaces: dict[int, KeySpace] = field(default_factory=dict)  # kv_rank -> space
    instances: dict[Hashable, Instance] = field(default_factory=dict)

    def devices(self) -> list[int]:
        """The arenas this model's instances store into, sorted (a copy)."""
        return sorted({inst.device for inst in self.instances.values()})


def check_layout(layout: dict, kind: str) -> dict:
    """Validate a layout description (ValueError naming the bad field); returns it."""
    if not isinstance(layout, dict):
        raise ValueError(f"layout must be a dict, got {type(layout).__name__}")
    for name in _LAYOUT_INTS:
        value = layout.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 1 << 32:
            raise ValueError(f"layout {name} must be a positive int, got {value!r}")
    if layout["row_bytes"] != layout["num_heads"] * layout["head_bytes"]:
        raise ValueError(f"layout row_bytes {layout['row_bytes']} != num_heads "
                         f"{layout['num_heads']} * head_bytes {layout['head_bytes']}")
    if layout["num_kv"] != (1 if kind == "mla" else 2):
        raise ValueError(f"layout num_kv {layout['num_kv']} does not fit kind {kind!r}")
    for name in ("dims", "dtype"):
        if not isinstance(layout.get(name), str) or not layout[name]:
            raise ValueError(f"layout {name} must be a non-empty str, got {layout.get(name)!r}")
    return layout


class Registry:
    """Instances by id, models by name, key spaces by (model, kv_rank). Thread-safe."""

    def __init__(self, chunk_size: int) -> None:
        self.chunk_size = chunk_size
        self._lock = threading.Lock()
        self._instances: dict[Hashable, Instance] = {}
        self._models: dict[str, Model] = {}
        self._num_spaces = 0
        self._by_ident: dict[int, KeySpace] = {}

    def register(self, instance_id: Hashable, model: str, layout: dict, *, kind: str,
                 tp_rank: int, tp_size: int, device: int, shared: bool = True) -> Instance:
        """Add an instance; ValueError naming the bad argument (nothing changes then).
        ``shared`` (MLA only): one object per chunk for every rank, else one per rank. Every
        instance of a model must agree (it is part of the layout fingerprint)."""
        if not isinstance(model, str) or not model or model != model.strip() or "\x00" in model:
            raise ValueError(f"model must be a non-empty str without surrounding spaces, got {model!r}")
        if kind not in ("mla", "mha"):
            raise ValueError(f"kind must be 'mla' or 'mha', got {kind!r}")
        if isinstance(tp_size, bool) or not isinstance(tp_size, int) or not 1 <= tp_size <= MAX_READERS:
            raise ValueError(f"tp_size must be an int in [1, {MAX_READERS}], got {tp_size!r}")
        if isinstance(tp_rank, bool) or not isinstance(tp_rank, int) or not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank must be an int in [0, tp_size={tp_size}), got {tp_rank!r}")
        check_layout(layout, kind)
        fields = ";".join(f"{k}={layout[k]}" for k in ("dims", "dtype", *_LAYOUT_INTS))
        shared = kind == "mla" and bool(shared)
        objects = "shared" if shared else "per-rank"
        fingerprint = f"model={model};kind={kind};objects={objects};chunk={self.chunk_size};{fields}"
        chunk_bytes = layout["num_layers"] * layout["num_kv"] * self.chunk_size * layout["row_bytes"]
        if chunk_bytes > MAX_CHUNK_BYTES:
            raise ValueError(f"one chunk of model {model!r} would be {chunk_bytes} bytes "
                             f"(> {MAX_CHUNK_BYTES}): lower chunk_size")
        with self._lock:
            if instance_id in self._instances:
                raise ValueError(f"instance {instance_id!r} is already registered")
            info = self._models.get(model)
            if info is not None and info.fingerprint != fingerprint:
                raise ValueError(f"instance {instance_id!r}: layout of model {model!r} differs from "
                                 f"the registered one ({fingerprint} != {info.fingerprint})")
            if info is None:
                info = self._models[model] = Model(model, kind, fingerprint,
                                                   layout_digest(fingerprint), chunk_bytes, shared)
            kv_rank = 0 if shared else tp_rank
            inst = Instance(instance_id, model, kind, tp_rank, tp_size, device,
                            self._space(info, kv_rank), chunk_bytes, chunk_bytes // layout["num_layers"],
                            layout["num_layers"], InternalOwner("writer", instance_id))
            info.instances[instance_id] = inst
            self._instances[instance_id] = inst
        return inst

    def unregister(self, instance_id: Hashable) -> Instance:
        with self._lock:
            inst = self._instance(instance_id)
            del self._instances[instance_id]
            del self._models[inst.model].instances[instance_id]
        return inst

    def instance(self, instance_id: Hashable) -> Instance:
        with self._lock:
            return self._instance(instance_id)

    def model(self, name: str) -> Model:
        with self._lock:
            info = self._models.get(name)
        if info is None:
            raise ValueError(f"unknown model {name!r}: no instance registered it")
        return info

    def spaces(self, name: str, num_ranks: int) -> list[KeySpace]:
        """Key spaces a lookup of ``name`` reads: one for a shared model, else ``num_ranks``."""
        info = self.model(name)
        with self._lock:
            return [self._space(info, r) for r in range(1 if info.shared else num_ranks)]

    def devices_of(self, name: str) -> list[int]:
        """The arenas the instances of model ``name`` store into (sorted)."""
        info = self.model(name)
        with self._lock:
            return info.devices()

    def device_of_space(self, space: KeySpace, default: int = 0) -> int:
        """Where loads into ``space`` go: the device of an instance of that space."""
        with self._lock:
            info = self._models.get(space.model)
            for inst in (info.instances.values() if info else ()):
                if inst.space is space:
                    return inst.device
        return default

    def instances(self) -> list[tuple[str, str, list[Instance]]]:
        """``(model, kind, instances)`` of every registered model (a copy, for status pages)."""
        with self._lock:
            return [(m.name, m.kind, list(m.instances.values())) for m in self._models.values()]

    def snapshot(self) -> dict:
        with self._lock:
            return {name: dict(kind=m.kind, layout=m.layout, chunk_bytes=m.chunk_bytes,
                               instances=len(m.instances)) for name, m in self._models.items()}

    def space_of_key(self, key: bytes) -> KeySpace | None:
        """The key space of an L1 key (None for a key of no space of this registry)."""
        return self._by_ident.get(int.from_bytes(key[HASH_BYTES:HASH_BYTES + 4], "little"))

    @property
    def num_instances(self) -> int:
        return len(self._instances)

    def _instance(self, instance_id: Hashable) -> Instance:
        inst = self._instances.get(instance_id)
        if inst is None:
            raise ValueError(f"unknown instance {instance_id!r}: register it first")
        return inst

    def _space(self, info: Model, kv_rank: int) -> KeySpace:
        space = info.spaces.get(kv_rank)
        if space is None:
            self._num_spaces += 1
            space = info.spaces[kv_rank] = KeySpace(info.name, info.layout, kv_rank, self._num_spaces)
            self._by_ident[space.ident] = space
        return space
