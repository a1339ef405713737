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
``NB,H,2,BS,D``    vLLM CPU backend (0.32)     the engine's ``[NB, H, BS, 2*D]`` tensor keeps
                                               all K rows of a head's block, then all V rows:
                                               pass ``t.view(NB, H, 2, BS, D)``
``NB,BS,D``        vLLM MLA (kind="mla")       one latent row per token, e.g. 576 bf16 or
                                               656-byte uint8 fp8_ds_mla records; vLLM CPU
                                               MLA ``[NB, 1, 16, 576]``: pass ``t.squeeze(1)``
``S,H,D``          SGLang token pools          MHA: layers = (k_layers, v_layers);
                                               MLA: [S, 1, 576] per layer; block size 1
=================  ==========================  =========================================

Every layout packs into the same chunk format ``[num_layers, num_kv, chunk_size, row_bytes]``
(layer-major; a row is the token's heads in order, each ``head_bytes`` long).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypeVar, Union

import torch

Layers = Union[torch.Tensor, Sequence[torch.Tensor], Mapping[str, torch.Tensor], tuple]
T = TypeVar("T")

KNOWN_DIMS = {
    "2,NB,BS,H,D": "mha",
    "NB,2,BS,H,D": "mha",
    "NB,H,BS,2D": "mha",
    "NB,H,2,BS,D": "mha",
    "NB,BS,D": "mla",
    "S,H,D": None,  # MHA pools (K/V lists) or MLA pools (H == 1)
}
INT_BY_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True, slots=True)
class PagedKV:
    """A paged KV cache of ``num_layers`` layers, as a copy kernel sees it.

    A *plane* is one (layer, K/V) pair; planes are numbered layer-major (``layer * num_kv + kv``).
    ``base_ptrs[layer][kv]`` is the byte address of the plane's block 0, token 0, head 0; a
    token's head ``h`` of slot ``block * block_size + pos`` starts ``block * stride_block_bytes +
    pos * stride_token_bytes + h * stride_head_bytes`` bytes later and is ``head_bytes`` long (a
    size-1 dimension has stride 0). ``word_bytes`` is the widest of 8/4/2/1 dividing the head
    size, the strides and every base address. ``tensors`` are the tensors given (SGLang MHA: the
    K layers, then the V layers); they keep the memory alive.

    What each copy path derives from this (its views, unit views, plane groups, the device address
    table) is built on first use and cached per instance: see :meth:`cached`.
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
    word_bytes: int
    base_ptrs: tuple[tuple[int, ...], ...] = field(repr=False, compare=False)
    tensors: tuple[torch.Tensor, ...] = field(repr=False, compare=False)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def row_bytes(self) -> int:
        """Bytes of one token's K (or V, or latent) row: ``num_heads * head_bytes``."""
        return self.num_heads * self.head_bytes

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    def chunk_shape(self, chunk_size: int) -> tuple[int, int, int, int]:
        """``(num_layers, num_kv, chunk_size, row_bytes)``: the chunk format."""
        return (self.num_layers, self.num_kv, _positive(chunk_size), self.row_bytes)

    def chunk_bytes(self, chunk_size: int) -> int:
        """Bytes of one chunk of ``chunk_size`` tokens, all layers."""
        return self.num_layers * self.layer_bytes(chunk_size)

    def layer_bytes(self, chunk_size: int) -> int:
        """Bytes of one layer's slice of a chunk: ``num_kv * chunk_size * row_bytes`` (contiguous,
        layer ``l`` starts ``l * layer_bytes`` into the chunk)."""
        return self.num_kv * _positive(chunk_size) * self.row_bytes

    def fingerprint(self) -> str:
        """Stable text of what makes two caches' chunks interchangeable (no pointers, no sizes)."""
        return (f"kind={self.kind};dims={self.dims};dtype={_dtype_name(self.dtype)};"
                f"layers={self.num_layers};kv={self.num_kv};heads={self.num_heads};"
                f"head_bytes={self.head_bytes};row_bytes={self.row_bytes}")

    def describe(self) -> dict[str, Any]:
        """Plain str/int values (a msgpack-able message) that size chunks without the tensors."""
        return dict(kind=self.kind, dims=self.dims, dtype=_dtype_name(self.dtype),
                    num_layers=self.num_layers, num_kv=self.num_kv, num_heads=self.num_heads,
                    head_bytes=self.head_bytes, row_bytes=self.row_bytes,
                    block_size=self.block_size, num_blocks=self.num_blocks)

    def cached(self, key: Any, build: Callable[[], T]) -> T:
        """``build()`` once per instance and ``key``: derived views and tables live with their
        users (the torch path, the Triton adapter) but are computed once per cache."""
        try:
            return self._cache[key]
        except KeyError:
            value = self._cache[key] = build()  # a racing second build is equal and harmless
            return value

    @classmethod
    def from_tensors(cls, layers: Layers, dims: str, *, kind: str) -> "PagedKV":
        """Describe a worker's paged cache.

        layers: per-layer tensors as a list, a tuple or a dict name -> tensor (layer order = the
                dict's order, as vLLM's ``kv_caches``), or one tensor with the layer as dim 0;
                for SGLang MHA pools (``"S,H,D"``, kind="mha") a pair ``(k_layers, v_layers)``.
                Views of one buffer are fine; each tensor's own strides are read.
        dims:   the per-layer tensor's dimensions (see the module table).
        kind:   "mha" or "mla".
        Raises ValueError naming what does not fit.
        """
        if not isinstance(kind, str) or kind not in ("mha", "mla"):
            raise ValueError(f"kind must be 'mha' or 'mla', got {kind!r}")
        if not isinstance(dims, str) or dims.replace(" ", "") not in KNOWN_DIMS:
            raise ValueError(f"unknown dims {dims!r}; expected one of {sorted(KNOWN_DIMS)}")
        dims = dims.replace(" ", "")
        want = KNOWN_DIMS[dims]
        if want is not None and want != kind:
            raise ValueError(f"dims {dims!r} is a {want} layout, but kind={kind!r}")
        names = dims.split(",")
        if dims == "S,H,D" and kind == "mha":
            groups = list(_kv_pair(layers, len(names)))
        else:
            groups = [_layer_list(layers, len(names), "layers")]
        flat = [t for g in groups for t in g]
        first = _check_same(flat, names, dims)
        size = dict(zip(names, first.shape))
        item = first.element_size()
        # a size-1 dimension never moves an address: its stride (which may be anything) is 0
        stride = {n: (s if size[n] > 1 else 0) for n, s in zip(names, first.stride())}
        for name in names:
            if size[name] == 0:
                what = {"NB": "blocks", "S": "slots", "BS": "tokens per block", "H": "heads"}
                raise ValueError(f"dim {name!r} of {dims!r} has size 0 (no {what.get(name, 'elements')}): "
                                 f"shape {tuple(first.shape)}")
            if size[name] > 1 and first.stride(names.index(name)) == 0:
                raise ValueError(f"dim {name!r} of {dims!r} has stride 0 (an expanded view): its "
                                 f"entries would share memory; strides {first.stride()}")
        head_name = "2D" if "2D" in size else "D"
        if first.stride(names.index(head_name)) != 1 and size[head_name] > 1:
            raise ValueError(f"the last dim {head_name} must be contiguous (stride 1), got strides {first.stride()}")
        if "2" in size and size["2"] != 2:
            raise ValueError(f"dim '2' of {dims!r} has size {size['2']}, expected 2 (K and V)")
        if head_name == "2D" and size["2D"] % 2:
            raise ValueError(f"dim '2D' has odd size {size['2D']}: cannot split into K and V halves")
        head_elems = size[head_name] // 2 if head_name == "2D" else size["D"]
        num_heads = size.get("H", 1)
        if kind == "mla" and num_heads != 1:
            raise ValueError(f"an MLA cache has one latent row per token, got H={num_heads} heads")
        if dims == "S,H,D":
            num_blocks, block_size, s_block, s_token = size["S"], 1, stride["S"], 0
        else:
            num_blocks, block_size, s_block, s_token = size["NB"], size["BS"], stride["NB"], stride["BS"]
        num_kv = 2 if kind == "mha" else 1
        if len(groups) == 2:
            kv_offsets = [0, 0]  # separate K and V tensors
        elif "2" in size:
            kv_offsets = [0, first.stride(names.index("2"))]
        elif head_name == "2D":
            kv_offsets = [0, head_elems]
        else:
            kv_offsets = [0]
        num_layers = len(groups[0])
        ptrs = tuple(tuple(groups[kv if len(groups) == 2 else 0][layer].data_ptr() + kv_offsets[kv] * item
                           for kv in range(num_kv)) for layer in range(num_layers))
        strides = (s_block * item, s_token * item, stride.get("H", 0) * item)
        head_bytes = head_elems * item
        word = word_bytes(head_bytes, *strides, *(p for row in ptrs for p in row))
        return cls(kind=kind, dims=dims, num_layers=num_layers, num_kv=num_kv,
                   num_blocks=num_blocks, block_size=block_size, num_heads=num_heads,
                   head_bytes=head_bytes, dtype=first.dtype, device=first.device,
                   stride_block_bytes=strides[0], stride_token_bytes=strides[1],
                   stride_head_bytes=strides[2], word_bytes=word, base_ptrs=ptrs,
                   tensors=tuple(flat))


def word_bytes(*values: int) -> int:
    """The widest of 8/4/2/1 bytes dividing every value (sizes, strides, addresses)."""
    for w in (8, 4, 2):
        if all(v % w == 0 for v in values):
            return w
    return 1


def _positive(chunk_size: Any) -> int:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return chunk_size


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _layer_list(layers: Layers, ndim: int, name: str) -> list:
    """A list of per-layer tensors from a list, tuple, dict or a stacked (layer-first) tensor."""
    if isinstance(layers, torch.Tensor):
        if layers.dim() != ndim + 1:
            raise ValueError(f"a stacked cache needs {ndim + 1} dims (layer first), got {tuple(layers.shape)}")
        out = list(layers.unbind(0))
    elif isinstance(layers, Mapping):
        out = list(layers.values())
    elif isinstance(layers, (list, tuple)):
        out = list(layers)
    else:
        raise ValueError(f"{name} must be a list, tuple or dict name -> tensor of layer tensors, "
                         f"or one stacked tensor; got {type(layers).__name__}")
    if not out:
        raise ValueError(f"{name} is empty: need at least one layer tensor")
    return out


def _kv_pair(layers: Layers, ndim: int) -> tuple[list, list]:
    if (not isinstance(layers, (list, tuple)) or len(layers) != 2
            or isinstance(layers[0], torch.Tensor) or isinstance(layers[1], torch.Tensor)):
        raise ValueError("SGLang MHA pools ('S,H,D', kind='mha') take layers=(k_layers, v_layers)")
    k_layers, v_layers = _layer_list(layers[0], ndim, "k_layers"), _layer_list(layers[1], ndim, "v_layers")
    if len(k_layers) != len(v_layers):
        raise ValueError(f"k_layers and v_layers must be equal in length, got {len(k_layers)} and {len(v_layers)}")
    return k_layers, v_layers


def _check_same(flat: list, names: list[str], dims: str) -> torch.Tensor:
    """Every entry is a dense tensor of ``len(names)`` dims, with layer 0's shape, strides,
    dtype and device; returns layer 0."""
    for i, t in enumerate(flat):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"layer {i} is a {type(t).__name__}, not a torch.Tensor")
        if t.layout != torch.strided:
            raise ValueError(f"layer {i} is a {t.layout} tensor; a paged cache must be dense (torch.strided)")
        if t.dim() != len(names):
            raise ValueError(f"layer {i} has shape {tuple(t.shape)}, expected {len(names)} dims for {dims!r}")
    first = flat[0]
    for i, t in enumerate(flat):
        if (t.shape, t.stride(), t.dtype, t.device) != (first.shape, first.stride(), first.dtype, first.device):
            raise ValueError(
                f"layer {i} is {tuple(t.shape)} stride {t.stride()} {t.dtype} on {t.device}; layer 0 is "
                f"{tuple(first.shape)} stride {first.stride()} {first.dtype} on {first.device}"
            )
    return first
