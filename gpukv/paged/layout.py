"""Paged KV cache layouts, described once from the worker's own tensors.

A layout is reduced to what a copy kernel needs: per-(layer, K/V) base addresses and byte strides
for block, token-in-block and head, plus the head size in bytes and the head count. The dims
string names the per-layer tensor's dimensions; physical orders (HND) come from the tensors' own
strides, so nothing is assumed about contiguity except that a head's ``D`` values are contiguous.

=================  ==========================  =========================================
dims               engine layout               notes
=================  ==========================  =========================================
``2,NB,BS,H,D``    vLLM flash-attn, kv-first   K = index 0, V = index 1 of dim 0
``NB,2,BS,H,D``    vLLM blocks-first/FlashInfer HND physical order via strides
``NB,H,BS,2D``     vLLM packed K|V             K = first D, V = last D of each head
``NB,BS,D``        vLLM MLA (kind="mla")       one latent row per token, e.g. 576 bf16 or
                                               656-byte uint8 fp8_ds_mla records
``S,H,D``          SGLang token pools          MHA: layers = (k_layers, v_layers);
                                               MLA: [S, 1, 576] per layer; block size 1
=================  ==========================  =========================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Union

import torch

Layers = Union[torch.Tensor, Sequence[torch.Tensor], tuple]

_KNOWN_DIMS = {
    "2,NB,BS,H,D": "mha",
    "NB,2,BS,H,D": "mha",
    "NB,H,BS,2D": "mha",
    "NB,BS,D": "mla",
    "S,H,D": None,  # MHA pools (K/V lists) or MLA pools (H == 1)
}


@dataclass(frozen=True, slots=True)
class PagedKV:
    """A paged KV cache of ``num_layers`` layers, as the pack/unpack kernels see it.

    ``base_ptrs`` is an int64 CPU tensor ``[num_layers, num_kv]`` of byte addresses of the first
    element of each layer's K (and V) for block 0, token 0, head 0; ``addr_table`` the same
    addresses flattened (layer-major) on the cache's device, for the kernels. Strides are in bytes.
    ``word_bytes`` is the widest of 8/4/2/1 dividing the head size, the strides and every base
    address. ``views`` holds, per (layer, kv), a strided view
    ``[num_blocks, block_size, num_heads, head_elems]`` of the same memory (the reference's view).

    Units (the torch path's view): a *unit* is the largest piece of a token row that is contiguous
    in the pages -- the whole row for NHD, MLA and SGLang pools, one head for HND and packed K|V.
    ``units`` holds per (layer, kv), layer-major, a 2-D view ``[num_units, unit_bytes / word_bytes]``
    in the word dtype; token ``(block, pos)`` row's units are
    ``block * unit_strides[0] + pos * unit_strides[1] + unit_offsets``, in chunk (head-major) order.
    ``host_units`` are the same views as numpy arrays for a CPU cache (empty otherwise).
    """

    kind: str
    dims: str
    num_layers: int
    num_kv: int
    num_blocks: int
    block_size: int
    num_heads: int
    head_bytes: int
    dtype: torch.dtype
    device: torch.device
    stride_block_bytes: int
    stride_token_bytes: int
    stride_head_bytes: int
    base_ptrs: torch.Tensor = field(repr=False, compare=False)
    views: tuple = field(repr=False, compare=False)
    tensors: tuple = field(repr=False, compare=False)
    addr_table: torch.Tensor = field(repr=False, compare=False)
    word_bytes: int
    unit_bytes: int
    unit_strides: tuple[int, int]
    unit_offsets: tuple[int, ...]
    units: tuple = field(repr=False, compare=False)
    host_units: tuple = field(repr=False, compare=False)

    @property
    def row_bytes(self) -> int:
        """Bytes of one token's K (or V, or latent) row: ``num_heads * head_bytes``."""
        return self.num_heads * self.head_bytes

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    def chunk_shape(self, chunk_size: int) -> tuple[int, int, int, int]:
        """``(num_layers, num_kv, chunk_size, row_bytes)``: the chunk format."""
        return (self.num_layers, self.num_kv, chunk_size, self.row_bytes)

    def chunk_bytes(self, chunk_size: int) -> int:
        if not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        return self.num_layers * self.num_kv * chunk_size * self.row_bytes

    def fingerprint(self) -> str:
        """Stable text of what makes two caches' chunks interchangeable (no pointers, no sizes)."""
        return (f"kind={self.kind};dims={self.dims};dtype={str(self.dtype).replace('torch.', '')};"
                f"layers={self.num_layers};kv={self.num_kv};heads={self.num_heads};"
                f"head_bytes={self.head_bytes};row_bytes={self.row_bytes}")

    @classmethod
    def from_tensors(cls, layers: Layers, dims: str, *, kind: str) -> "PagedKV":
        """Describe a worker's paged cache.

        layers: a list of per-layer tensors, or one tensor with the layer as dim 0; for SGLang MHA
        pools (``"S,H,D"``, kind="mha") a pair ``(k_layers, v_layers)``.
        dims:   the per-layer tensor's dimensions (see the module table).
        kind:   "mha" or "mla".
        Raises ValueError naming what does not fit.
        """
        if kind not in ("mha", "mla"):
            raise ValueError(f"kind must be 'mha' or 'mla', got {kind!r}")
        if not isinstance(dims, str) or dims.replace(" ", "") not in _KNOWN_DIMS:
            raise ValueError(f"unknown dims {dims!r}; expected one of {sorted(_KNOWN_DIMS)}")
        dims = dims.replace(" ", "")
        want = _KNOWN_DIMS[dims]
        if want is not None and want != kind:
            raise ValueError(f"dims {dims!r} is a {want} layout, but kind={kind!r}")
        names = dims.split(",")
        if dims == "S,H,D" and kind == "mha":
            k_layers, v_layers = _kv_pair(layers)
            groups = [k_layers, v_layers]
        else:
            groups = [_layer_list(layers, len(names))]
        flat = [t for g in groups for t in g]
        first = flat[0]
        for i, t in enumerate(flat):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"layer {i} is a {type(t).__name__}, not a torch.Tensor")
            if t.dim() != len(names):
                raise ValueError(f"layer {i} has shape {tuple(t.shape)}, expected {len(names)} dims for {dims!r}")
            if (t.shape, t.stride(), t.dtype, t.device) != (first.shape, first.stride(), first.dtype, first.device):
                raise ValueError(
                    f"layer {i} is {tuple(t.shape)} stride {t.stride()} {t.dtype} on {t.device}; layer 0 is "
                    f"{tuple(first.shape)} stride {first.stride()} {first.dtype} on {first.device}"
                )
        size = dict(zip(names, first.shape))
        stride = dict(zip(names, first.stride()))
        item = first.element_size()
        head_name = "2D" if "2D" in size else "D"
        if stride[head_name] != 1:
            raise ValueError(f"the last dim {head_name} must be contiguous (stride 1), got strides {first.stride()}")
        if any(s < 0 for s in first.stride()):
            raise ValueError(f"negative strides are not supported: {first.stride()}")
        if "2" in size and size["2"] != 2:
            raise ValueError(f"dim '2' of {dims!r} has size {size['2']}, expected 2 (K and V)")
        if head_name == "2D" and size["2D"] % 2:
            raise ValueError(f"dim '2D' has odd size {size['2D']}: cannot split into K and V halves")
        head_elems = size[head_name] // 2 if head_name == "2D" else size["D"]
        num_heads = size.get("H", 1)
        if kind == "mla" and num_heads != 1:
            raise ValueError(f"an MLA cache has one latent row per token, got H={num_heads} heads")
        if dims == "S,H,D":
            num_blocks, block_size = size["S"], 1
            s_block, s_token = stride["S"], 0
        else:
            num_blocks, block_size = size["NB"], size["BS"]
            s_block, s_token = stride["NB"], stride["BS"]
        s_head = stride.get("H", 0)
        num_kv = 2 if kind == "mha" else 1
        if kind == "mha" and dims == "S,H,D":
            kv_offsets = [0]  # separate K and V tensors
        elif "2" in size:
            kv_offsets = [0, stride["2"]]
        elif head_name == "2D":
            kv_offsets = [0, head_elems]
        else:
            kv_offsets = [0]
        ptrs, views = [], []
        for layer in range(len(groups[0])):
            row_ptrs, row_views = [], []
            for kv in range(num_kv):
                t = groups[kv][layer] if len(groups) == 2 else groups[0][layer]
                off = 0 if len(groups) == 2 else kv_offsets[kv]
                row_ptrs.append(t.data_ptr() + off * item)
                row_views.append(torch.as_strided(
                    t, (num_blocks, block_size, num_heads, head_elems), (s_block, s_token, s_head, 1),
                    t.storage_offset() + off))
            ptrs.append(row_ptrs)
            views.append(tuple(row_views))
        strides = (s_block * item, s_token * item, s_head * item)
        head_bytes = head_elems * item
        flat_views = [v for row in views for v in row]
        word = word_bytes(head_bytes, *strides, *(p for row in ptrs for p in row),
                          *(v.storage_offset() * item for v in flat_views))
        unit, unit_strides, unit_offsets = _units(num_blocks, block_size, num_heads, head_bytes,
                                                  strides, word)
        num_units = ((num_blocks - 1) * unit_strides[0] + (block_size - 1) * unit_strides[1]
                     + max(unit_offsets) + 1)
        units = tuple(_unit_view(v, num_units, unit, word) for v in flat_views)
        host_units = tuple(u.numpy() for u in units) if first.device.type == "cpu" else ()
        base_ptrs = torch.tensor(ptrs, dtype=torch.int64)
        return cls(kind=kind, dims=dims, num_layers=len(groups[0]), num_kv=num_kv,
                   num_blocks=num_blocks, block_size=block_size, num_heads=num_heads,
                   head_bytes=head_bytes, dtype=first.dtype, device=first.device,
                   stride_block_bytes=strides[0], stride_token_bytes=strides[1],
                   stride_head_bytes=strides[2],
                   base_ptrs=base_ptrs, views=tuple(views), tensors=tuple(flat),
                   addr_table=base_ptrs.flatten().to(first.device),
                   word_bytes=word, unit_bytes=unit, unit_strides=unit_strides,
                   unit_offsets=unit_offsets, units=units, host_units=host_units)


def _layer_list(layers: Layers, ndim: int) -> list[torch.Tensor]:
    if isinstance(layers, torch.Tensor):
        if layers.dim() != ndim + 1:
            raise ValueError(f"a stacked cache needs {ndim + 1} dims (layer first), got {tuple(layers.shape)}")
        return list(layers.unbind(0))
    layers = list(layers)
    if not layers:
        raise ValueError("layers is empty: need at least one layer tensor")
    return layers


def _kv_pair(layers: Layers) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    if isinstance(layers, torch.Tensor) or len(layers) != 2 or isinstance(layers[0], torch.Tensor):
        raise ValueError("SGLang MHA pools ('S,H,D', kind='mha') take layers=(k_layers, v_layers)")
    k_layers, v_layers = list(layers[0]), list(layers[1])
    if not k_layers or len(k_layers) != len(v_layers):
        raise ValueError(f"k_layers and v_layers must be non-empty and equal in length, "
                         f"got {len(k_layers)} and {len(v_layers)}")
    return k_layers, v_layers


INT_BY_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def word_bytes(*values: int) -> int:
    """The widest of 8/4/2/1 bytes dividing every value (sizes, strides, addresses)."""
    for w in (8, 4, 2):
        if all(v % w == 0 for v in values):
            return w
    return 1


def _units(num_blocks: int, block_size: int, num_heads: int, head_bytes: int,
           strides: tuple[int, int, int], word: int) -> tuple[int, tuple[int, int], tuple[int, ...]]:
    """(unit bytes, (block, token) strides in units, a row's unit offsets in head-major order)."""
    # a size-1 dimension's stride never moves an address: treat it as 0 (it may be anything)
    s_block = strides[0] if num_blocks > 1 else 0
    s_token = strides[1] if block_size > 1 else 0
    s_head = strides[2] if num_heads > 1 else head_bytes
    row = num_heads * head_bytes
    if s_head == head_bytes and s_block % row == 0 and s_token % row == 0:
        return row, (s_block // row, s_token // row), (0,)
    unit = head_bytes if s_block % head_bytes == 0 and s_token % head_bytes == 0 \
        and s_head % head_bytes == 0 else word
    offsets = tuple((h * s_head + w) // unit
                    for h in range(num_heads) for w in range(0, head_bytes, unit))
    return unit, (s_block // unit, s_token // unit), offsets


def _unit_view(view: torch.Tensor, num_units: int, unit: int, word: int) -> torch.Tensor:
    """``[num_units, unit // word]`` word view of the memory that starts at ``view``'s first byte."""
    raw = view.detach().view(torch.uint8)
    units = torch.as_strided(raw, (num_units, unit), (unit, 1), raw.storage_offset())
    return units.view(INT_BY_SIZE[word])
