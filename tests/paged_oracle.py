"""An oracle for pack/unpack that never touches PagedKV: token rows read and written with plain
torch indexing of the ORIGINAL tensors, per dims string.

For each dims string the indexing below is the layout's definition (DESIGN.md's table): e.g. for
the vLLM CPU layout ``NB,H,2,BS,D`` token ``n`` of block ``b`` has K row ``t[b, :, 0, n]``. A row
is the token's heads in order, as bytes (``t.view(torch.uint8)``), so every dtype is one path.
"""

from __future__ import annotations

import torch

from paged_cases import layer_tensors


def layer_planes(layers, dims: str, kind: str) -> list[list[torch.Tensor]]:
    """``[layer][kv]`` -> the tensor holding that plane, in the order from_tensors must use."""
    if dims == "S,H,D" and kind == "mha":
        k, v = layers
        return [[a, b] for a, b in zip(layer_tensors(k), layer_tensors(v))]
    tensors = list(layers.unbind(0)) if isinstance(layers, torch.Tensor) else layer_tensors(layers)
    return [[t] * (2 if kind == "mha" else 1) for t in tensors]


def block_size(layers, dims: str, kind: str) -> int:
    t = layer_planes(layers, dims, kind)[0][0]
    return 1 if dims == "S,H,D" else t.shape[dims.split(",").index("BS")]


def _index(t: torch.Tensor, dims: str, kind: str, kv: int, b: torch.Tensor, p: torch.Tensor):
    """(byte view of ``t``, index tuple) selecting ``[n, H, head_bytes]`` rows of tokens (b, p)."""
    u = t.view(torch.uint8)
    if dims == "2,NB,BS,H,D":
        return u, (kv, b, p)
    if dims == "NB,2,BS,H,D":
        return u, (b, kv, p)
    if dims == "NB,H,BS,2D":
        half = u.shape[-1] // 2
        return u, (b, slice(None), p, slice(kv * half, (kv + 1) * half))
    if dims == "NB,H,2,BS,D":
        return u, (b, slice(None), kv, p)
    if dims == "NB,BS,D":
        return u.unsqueeze(2), (b, p)
    if dims == "S,H,D":
        return u, (b,)
    raise ValueError(dims)


def token_rows(layers, dims: str, kind: str, slots: torch.Tensor) -> torch.Tensor:
    """uint8 ``[num_layers, num_kv, len(slots), row_bytes]``: a copy of the rows of valid ``slots``
    (every slot must be >= 0)."""
    bs = block_size(layers, dims, kind)
    out = []
    for planes in layer_planes(layers, dims, kind):
        per = []
        for kv, t in enumerate(planes):
            b, p = slots // bs, slots % bs
            u, idx = _index(t, dims, kind, kv, b.to(t.device), p.to(t.device))
            rows = u[idx]  # [n, H, head_bytes]
            per.append(rows.reshape(len(slots), rows.shape[1:].numel()))
        out.append(torch.stack(per))
    return torch.stack(out)


def put_rows(layers, dims: str, kind: str, slots: torch.Tensor, rows: torch.Tensor,
             layer_range: tuple[int, int] | None = None) -> None:
    """Write ``rows`` (``[num_layers, num_kv, len(slots), row_bytes]``, or only the layers in
    ``layer_range``) into the tensors at valid ``slots``."""
    bs = block_size(layers, dims, kind)
    planes = layer_planes(layers, dims, kind)
    start, stop = layer_range or (0, len(planes))
    for i, layer in enumerate(range(start, stop)):
        for kv, t in enumerate(planes[layer]):
            b, p = (slots // bs).to(t.device), (slots % bs).to(t.device)
            u, idx = _index(t, dims, kind, kv, b, p)
            u[idx] = rows[i, kv].to(t.device).view(u[idx].shape)


def expected_arena(before: torch.Tensor, layers, dims: str, kind: str, slots: torch.Tensor,
                   offsets, chunk_size: int, layer_range: tuple[int, int] | None = None) -> torch.Tensor:
    """What ``arena`` (contents ``before``) must hold after pack: each chunk's valid tokens' rows
    of the layers in range, in ``[num_layers, num_kv, chunk_size, row_bytes]`` at its offset;
    every other byte as it was."""
    want = before.detach().cpu().clone()
    slots = slots.cpu().long()
    planes = layer_planes(layers, dims, kind)
    num_layers, num_kv = len(planes), len(planes[0])
    start, stop = layer_range or (0, num_layers)
    for c, off in enumerate(torch.as_tensor(offsets).tolist()):
        s = slots[c * chunk_size:(c + 1) * chunk_size]
        valid = s >= 0
        rows = token_rows(layers, dims, kind, s[valid]).cpu()
        row_bytes = rows.shape[-1]
        chunk = want[off:off + num_layers * num_kv * chunk_size * row_bytes]
        chunk = chunk.view(num_layers, num_kv, chunk_size, row_bytes)
        chunk[start:stop, :, valid] = rows[start:stop]
    return want


POISON = 0xA5


def scattered_offsets(num_chunks: int, chunk_bytes: int, gap: int = 48) -> tuple[list[int], int]:
    """Chunks out of order with gaps, 16-byte aligned: [chunk n-1][gap][chunk n-2]...; and the
    arena size they need."""
    step = -(-(chunk_bytes + gap) // 16) * 16
    return [(num_chunks - 1 - i) * step for i in range(num_chunks)], num_chunks * step


def check_pack_unpack(layers, dims: str, kind: str, slots: torch.Tensor, *, backend: str,
                      chunk_size: int, layer_range=None, arena_shift: int = 0) -> None:
    """The subject (gpukv's pack and unpack) against the oracle, bit-exact, every byte checked.

    pack into a poisoned arena: it equals :func:`expected_arena` (gaps, ``-1`` rows and layers out
    of range keep the poison) and the pages are unchanged. unpack into a poisoned copy of the
    pages: the valid slots of the layers in range hold the packed rows, and every other byte of
    every storage keeps the poison.
    """
    from gpukv.paged.copy import layer_range as as_range, pack, unpack
    from gpukv.paged.layout import PagedKV

    from paged_cases import clone_layers, fill, flat_bytes

    device = layer_planes(layers, dims, kind)[0][0].device
    paged = PagedKV.from_tensors(layers, dims, kind=kind)
    num_chunks = slots.numel() // chunk_size
    offsets, size = scattered_offsets(num_chunks, paged.chunk_bytes(chunk_size))
    backing = torch.full((size + arena_shift,), POISON, dtype=torch.uint8, device=device)
    arena = backing[arena_shift:]
    pages_before = flat_bytes(layers)
    span = as_range(paged, layer_range) or (0, paged.num_layers)
    pack(paged, slots.to(device), arena, offsets, chunk_size=chunk_size, backend=backend,
         layers=layer_range)
    want = expected_arena(torch.full((size,), POISON, dtype=torch.uint8), layers, dims, kind,
                          slots, offsets, chunk_size, span)
    assert torch.equal(arena.cpu(), want), "pack differs from the oracle"
    assert bool((backing[:arena_shift] == POISON).all())
    assert all(torch.equal(a, b) for a, b in zip(flat_bytes(layers), pages_before)), "pack wrote pages"
    dst_layers = clone_layers(layers)
    fill(dst_layers, POISON)
    dst = PagedKV.from_tensors(dst_layers, dims, kind=kind)
    unpack(dst, slots.to(device), arena, offsets, chunk_size=chunk_size, backend=backend,
           layers=layer_range)
    assert torch.equal(arena.cpu(), want), "unpack wrote the arena"
    valid = slots[slots >= 0].long().cpu()
    got = token_rows(dst_layers, dims, kind, valid).cpu()
    src = token_rows(layers, dims, kind, valid).cpu()
    start, stop = span
    assert torch.equal(got[start:stop], src[start:stop]), "unpacked rows differ from the pages'"
    put_rows(dst_layers, dims, kind, valid, torch.full_like(got[start:stop], POISON), span)
    assert all(bool((s == POISON).all()) for s in flat_bytes(dst_layers)), "unpack wrote other bytes"
