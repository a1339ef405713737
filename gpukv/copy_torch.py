"""The fast CPU path of pack/unpack: row gathers straight into / out of the arena.

When a layout's token rows are contiguous and evenly spaced (NHD, MLA, SGLang pools), each layer
is a 2-D ``[num_slots, row_words]`` view in the widest integer word that divides the row, and a
chunk moves with one ``index_select(out=arena view)`` / ``index_copy_`` per (layer, K/V): one
memcpy per row, no temporary. Other layouts (HND, packed K|V) gather per head through advanced
indexing. Arguments are validated by :mod:`gpukv.copy`; this module assumes them correct.
"""

from __future__ import annotations

import torch

from gpukv.layout import PagedKV

_INT_BY_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def word_bytes(*values: int) -> int:
    """The widest of 8/4/2/1 bytes dividing every value (sizes, strides, addresses)."""
    for w in (8, 4, 2):
        if all(v % w == 0 for v in values):
            return w
    return 1


def _layer_views(paged: PagedKV) -> tuple[list, int]:
    """Per (layer, kv) either a 2-D row view ``[num_slots, row_words]`` or a 4-D element view."""
    item = paged.head_bytes // paged.views[0][0].shape[-1]
    heads, rows = paged.num_heads, paged.row_bytes
    flat = (heads == 1 or paged.stride_head_bytes == paged.head_bytes) and (
        paged.block_size == 1 or paged.stride_token_bytes == rows) and (
        paged.num_blocks == 1 or paged.stride_block_bytes == rows * paged.block_size)
    if not flat:
        int_dtype = _INT_BY_SIZE[item]
        return [[v.view(int_dtype) for v in kv] for kv in paged.views], 0
    word = word_bytes(rows, *[int(p) for p in paged.base_ptrs.flatten().tolist()])
    out = []
    for kv_views in paged.views:
        row = []
        for v in kv_views:
            flat2d = torch.as_strided(v.view(_INT_BY_SIZE[item]), (paged.num_slots, rows // item),
                                      (rows // item, 1), v.storage_offset())
            row.append(flat2d.view(_INT_BY_SIZE[word]))
        out.append(row)
    return out, word


def _chunk_views(paged: PagedKV, arena: torch.Tensor, offsets: torch.Tensor, chunk_size: int,
                 word: int) -> list[torch.Tensor]:
    nbytes = paged.chunk_bytes(chunk_size)
    out = []
    for off in offsets.tolist():
        raw = arena[off:off + nbytes]
        if word:
            out.append(raw.view(_INT_BY_SIZE[word]).view(paged.num_layers, paged.num_kv, chunk_size, -1))
        else:
            item = paged.head_bytes // paged.views[0][0].shape[-1]
            out.append(raw.view(_INT_BY_SIZE[item]).view(paged.num_layers, paged.num_kv, chunk_size,
                                                         paged.num_heads, -1))
    return out


def pack_torch(paged: PagedKV, slots: torch.Tensor, arena: torch.Tensor, offsets: torch.Tensor, *,
               chunk_size: int) -> None:
    """Pages -> arena. ``slots`` int64 on the cache's device; ``offsets`` CPU int64 (validated)."""
    views, word = _layer_views(paged)
    chunks = _chunk_views(paged, arena, offsets, chunk_size, word)
    bs = paged.block_size
    for c, chunk in enumerate(chunks):
        s = slots[c * chunk_size:(c + 1) * chunk_size]
        valid = s >= 0
        pos = None if bool(valid.all()) else torch.nonzero(valid).flatten()
        s_valid = s if pos is None else s[pos]
        for layer in range(paged.num_layers):
            for kv in range(paged.num_kv):
                src, dst = views[layer][kv], chunk[layer, kv]
                if word and pos is None:
                    torch.index_select(src, 0, s_valid, out=dst)
                elif word:
                    dst.index_copy_(0, pos, src.index_select(0, s_valid))
                elif pos is None:
                    dst.copy_(src[s_valid // bs, s_valid % bs])
                else:
                    dst.index_copy_(0, pos, src[s_valid // bs, s_valid % bs])


def unpack_torch(paged: PagedKV, slots: torch.Tensor, arena: torch.Tensor, offsets: torch.Tensor, *,
                 chunk_size: int) -> None:
    """Arena -> pages; the arguments mean what they do in :func:`pack_torch`."""
    views, word = _layer_views(paged)
    chunks = _chunk_views(paged, arena, offsets, chunk_size, word)
    bs = paged.block_size
    for c, chunk in enumerate(chunks):
        s = slots[c * chunk_size:(c + 1) * chunk_size]
        valid = s >= 0
        pos = None if bool(valid.all()) else torch.nonzero(valid).flatten()
        s_valid = s if pos is None else s[pos]
        for layer in range(paged.num_layers):
            for kv in range(paged.num_kv):
                dst, src = views[layer][kv], chunk[layer, kv]
                rows = src if pos is None else src.index_select(0, pos)
                if word:
                    dst.index_copy_(0, s_valid, rows)
                else:
                    dst[s_valid // bs, s_valid % bs] = rows
