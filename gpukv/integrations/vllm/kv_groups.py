"""vLLM's KV cache groups as gpukv serves them, and the server-side *parts* of an engine's KV.

With vLLM's hybrid KV cache manager a model's layers fall into KV cache groups, one per kind of
attention (``kv_cache_config.kv_cache_groups``): each group has its own block table per request,
its own block ids (unique within the group only) and its own layers. gpukv serves:

- **full attention** (``FullAttentionSpec``, ``MLAAttentionSpec``): every block of the prefix;
- **sliding window** (``SlidingWindowSpec``): vLLM replaces the blocks that fall out of a
  request's window with its null block (block id 0, which vLLM's block pool reserves) and frees
  them at the next step's schedule. A load writes only the group's non-null blocks (vLLM
  allocates real blocks only inside the window of the hit's end); a store copies only chunks
  whose blocks in that group are all still the request's: none null, none before the window as
  of the step's schedule (:meth:`KVGroup.live_from`), since vLLM may have freed and reused them.
  Its older chunks are stored too (while their blocks are live: any later hit may end anywhere)
  but a hit does not require them: it needs the group's chunks inside the window before the
  hit's end only (:mod:`.group_lookup`), so a hole left by a freed block does not cut it.

Every other kind (``MambaSpec`` -- SSM / linear-attention states, chunked local attention,
cross attention, sink, sparse-attention caches...) and groups of different block sizes are
refused (:func:`refusal`): the engine runs uncached, with one log line naming the group.

A *part* is one pipeline stage's layers of one group: its own model key on the server (the
stage's key, tagged with the group when there are several: :func:`group_key`) and its own
server request id per vLLM request (:func:`part_request_id`). A model with one full-attention
group keeps the keys and request ids of a connector without groups.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

NULL_BLOCK = 0  # vLLM's BlockPool reserves block 0 as its null block (never a request's block)
KINDS = {"FullAttentionSpec": "full", "MLAAttentionSpec": "full", "SlidingWindowSpec": "sliding"}


@dataclass(frozen=True, slots=True)
class KVGroup:
    """One KV cache group: ``index`` in vLLM's list, ``kind`` ("full" or "sliding"), ``window``
    (tokens, sliding only) and its layer names (vLLM's, this process's)."""

    index: int
    kind: str = "full"
    window: int = 0
    layer_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("full", "sliding"):
            raise ValueError(f"KV cache group kind must be 'full' or 'sliding', got {self.kind!r}")
        if self.kind == "sliding" and (not isinstance(self.window, int) or self.window <= 0):
            raise ValueError(f"a sliding-window group needs a positive window, got {self.window!r}")

    @property
    def sliding(self) -> bool:
        return self.kind == "sliding"

    @property
    def tag(self) -> str:
        """Key material: the group's position and what its blocks hold."""
        return f"g{self.index}-{self.kind}" + (f"{self.window}" if self.sliding else "")

    def live_from(self, computed_at_schedule: int) -> int:
        """The first token whose block vLLM cannot have freed by the end of a step scheduled
        with ``computed_at_schedule`` tokens computed (vLLM frees a sliding window's blocks
        entirely before ``computed - window + 1``, rounded down to blocks by the caller): 0
        for full attention."""
        return max(0, computed_at_schedule - self.window + 1) if self.sliding else 0


ONE_GROUP = (KVGroup(0),)


def kv_groups(kv_cache_config: Any) -> tuple[tuple[KVGroup, ...], str | None]:
    """vLLM's groups as :class:`KVGroup` and None, or ``((), why)`` when gpukv cannot serve
    one of them (see the module docstring)."""
    specs = [(g.kv_cache_spec, tuple(g.layer_names)) for g in kv_cache_config.kv_cache_groups]
    if not specs:
        return (), "the model has no KV cache groups"
    out, sizes = [], set()
    for index, (spec, layers) in enumerate(specs):
        name = type(spec).__name__
        kind = KINDS.get(name)
        if kind is None:
            what = "an SSM / linear-attention state" if "Mamba" in name else "a KV cache"
            return (), (f"KV cache group {index} is {what} ({name}, layers {list(layers[:2])}...), "
                        "which gpukv does not store")
        window = int(getattr(spec, "sliding_window", 0) or 0) if kind == "sliding" else 0
        if kind == "sliding" and int(getattr(spec, "extra_retained_tokens", 0) or 0):
            return (), (f"KV cache group {index} ({name}) retains tokens beyond its window "
                        "(extra_retained_tokens), which gpukv does not model")
        sizes.add(int(spec.block_size))
        out.append(KVGroup(index, kind, window, layers))
    if len(sizes) > 1:
        return (), f"the KV cache groups have different block sizes {sorted(sizes)}"
    return tuple(out), None


def group_key(stage_key: str, group: KVGroup, num_groups: int) -> str:
    """The server's model key of one group of a stage: the stage's own key for a model with one
    full-attention group (its objects are those of a connector without groups). A model with
    one sliding-window group gets a key of its own too: a connector without groups stored its
    chunks from vLLM's null block where the window had passed."""
    if num_groups == 1 and not group.sliding:
        return stage_key
    digest = hashlib.blake2b(f"{stage_key}|{group.tag}".encode(), digest_size=4).hexdigest()
    return f"{stage_key}-{digest}"


def part_request_id(request_id: str, stage: int, num_stages: int, group: int = 0,
                    num_groups: int = 1) -> str:
    """The server's request id of one part of a vLLM request (the server keeps one model per
    request id): the vLLM id itself with one stage and one group."""
    return (request_id + (f"@pp{stage}" if num_stages > 1 else "")
            + (f"@g{group}" if num_groups > 1 else ""))


@dataclass(frozen=True, slots=True)
class Parts:
    """An engine's parts: ``stage_keys`` (one model key per pipeline stage) x ``groups``. The
    scheduler looks up every part; a stage's workers register, load and store its groups."""

    stage_keys: tuple[str, ...]
    groups: tuple[KVGroup, ...] = ONE_GROUP

    def __post_init__(self) -> None:
        if not self.stage_keys or not self.groups:
            raise ValueError("an engine has at least one pipeline stage and one KV cache group")

    @classmethod
    def of(cls, stage_keys: str | Sequence[str], groups: Sequence[KVGroup] = ONE_GROUP) -> "Parts":
        keys = (stage_keys,) if isinstance(stage_keys, str) else tuple(stage_keys)
        return cls(keys, tuple(groups))

    @property
    def num_stages(self) -> int:
        return len(self.stage_keys)

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def all(self) -> list[tuple[int, int]]:
        """Every (stage, group index), stage-major."""
        return [(s, g) for s in range(self.num_stages) for g in range(self.num_groups)]

    def key(self, stage: int, group: int) -> str:
        return group_key(self.stage_keys[stage], self.groups[group], self.num_groups)

    def request_id(self, request_id: str, stage: int, group: int) -> str:
        return part_request_id(request_id, stage, self.num_stages, group, self.num_groups)

    @property
    def keys(self) -> list[str]:
        return [self.key(s, g) for s, g in self.all]

    def request_ids(self, request_id: str) -> list[str]:
        return [self.request_id(request_id, s, g) for s, g in self.all]
