"""Layer ranges: pack/unpack of layers [start, stop) of each chunk, on every backend.

Offsets still point at chunk starts; the other layers' bytes in the arena and in the pages stay
exactly as they were (checked against the oracle over every byte).
"""

import pytest
import torch

from gpukv.paged.copy import pack, unpack
from gpukv.paged.layout import PagedKV
from paged_cases import backend_devices, flat_bytes, make_cache, random_bits
from paged_oracle import check_pack_unpack, expected_arena, put_rows, token_rows


def _slots(num_slots, n, seed=1, holes=(1, 5)):
    slots = torch.randperm(num_slots, generator=torch.Generator().manual_seed(seed))[:n]
    slots[list(holes)] = -1
    return slots


@pytest.mark.parametrize("backend, device", backend_devices())
@pytest.mark.parametrize("layers", [(0, 1), (1, 3), range(2, 4), (0, 4), range(3, 4)])
@pytest.mark.parametrize("layout", ["kv_first", "flashinfer_hnd", "cross_cpu_split", "mla"])
def test_layer_range_moves_only_those_layers(layout, layers, backend, device):
    cache, dims, kind = make_cache(layout, num_layers=4, num_blocks=6, device=device)
    check_pack_unpack(cache, dims, kind, _slots(96, 32), backend=backend, chunk_size=16,
                      layer_range=layers)


@pytest.mark.parametrize("backend, device", backend_devices())
def test_layer_by_layer_unpack_into_used_pages_equals_one_full_unpack(backend, device):
    """What a connector does: unpack layer 0, then 1, ... into pages that hold other data; the
    result is one full unpack, and after layer l only layers <= l have changed."""
    cache, dims, kind = make_cache("blocks_first", num_layers=3, num_blocks=6, device=device)
    paged = PagedKV.from_tensors(cache, dims, kind=kind)
    slots = _slots(96, 48)
    cb = paged.chunk_bytes(16)
    arena = torch.zeros(3 * cb, dtype=torch.uint8, device=device)
    offsets = [cb, 2 * cb, 0]
    pack(paged, slots.to(device), arena, offsets, chunk_size=16, backend=backend)
    dst_cache, _, _ = make_cache("blocks_first", num_layers=3, num_blocks=6, seed=5, device=device)
    dst = PagedKV.from_tensors(dst_cache, dims, kind=kind)
    valid = slots[slots >= 0]
    before = token_rows(dst_cache, dims, kind, valid).cpu()
    for layer in range(3):
        unpack(dst, slots.to(device), arena, offsets, chunk_size=16, backend=backend,
               layers=(layer, layer + 1))
        now = token_rows(dst_cache, dims, kind, valid).cpu()
        assert torch.equal(now[: layer + 1], token_rows(cache, dims, kind, valid).cpu()[: layer + 1])
        assert torch.equal(now[layer + 1:], before[layer + 1:])
    # bytes off the slots were never touched: put the old rows back and compare every byte
    full_before = flat_bytes(make_cache("blocks_first", num_layers=3, num_blocks=6, seed=5)[0])
    put_rows(dst_cache, dims, kind, valid, before)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(flat_bytes(dst_cache), full_before))


@pytest.mark.parametrize("backend, device", backend_devices())
def test_layer_range_pack_keeps_other_layers_of_a_used_arena(backend, device):
    cache, dims, kind = make_cache("packed", num_layers=4, num_blocks=4, device=device)
    paged = PagedKV.from_tensors(cache, dims, kind=kind)
    slots = _slots(64, 32, holes=(0,))
    gen = torch.Generator().manual_seed(9)
    arena = random_bits((2 * paged.chunk_bytes(16) + 32,), torch.uint8, gen, device)
    before = arena.cpu().clone()
    offsets = [paged.chunk_bytes(16) + 32, 0]
    pack(paged, slots.to(device), arena, offsets, chunk_size=16, backend=backend, layers=range(1, 3))
    want = expected_arena(before, cache, dims, kind, slots, offsets, 16, (1, 3))
    assert torch.equal(arena.cpu(), want) and not torch.equal(want, before)


@pytest.mark.parametrize("layers, message", [
    ((0, 0), "layers (0, 0) is not a non-empty range inside [0, 3)"),
    ((2, 1), "layers (2, 1) is not a non-empty range"),
    ((0, 4), "layers (0, 4) is not a non-empty range inside [0, 3) (the cache has 3 layers)"),
    ((-1, 2), "layers (-1, 2) is not a non-empty range"),
    (range(0, 3, 2), "layers must be a contiguous range (step 1), got range(0, 3, 2)"),
    (range(2, 0, -1), "layers must be a contiguous range (step 1)"),
    ((0, 1, 2), "layers must be None, (start, stop) or a range, got (0, 1, 2)"),
    ([0, 2], "layers must be None, (start, stop) or a range, got [0, 2]"),
    (1, "layers must be None, (start, stop) or a range, got 1"),
    ((0.0, 2), "layers must hold ints, got (0.0, 2)"),
    ((False, True), "layers must hold ints"),
])
@pytest.mark.parametrize("op", [pack, unpack])
def test_bad_layer_ranges_raise_before_writing(op, layers, message):
    cache, dims, kind = make_cache("kv_first", num_layers=3, num_blocks=4)
    paged = PagedKV.from_tensors(cache, dims, kind=kind)
    arena = torch.full((paged.chunk_bytes(16),), 7, dtype=torch.uint8)
    pages = flat_bytes(cache)
    with pytest.raises(ValueError, match=__import__("re").escape(message)):
        op(paged, torch.arange(16), arena, [0], chunk_size=16, layers=layers)
    assert bool((arena == 7).all()) and all(torch.equal(a, b) for a, b in zip(flat_bytes(cache), pages))


def test_full_range_is_the_same_as_none():
    cache, dims, kind = make_cache("mla", num_layers=2)
    paged = PagedKV.from_tensors(cache, dims, kind=kind)
    a = torch.zeros(paged.chunk_bytes(16), dtype=torch.uint8)
    b = a.clone()
    pack(paged, torch.arange(16), a, [0], chunk_size=16, layers=(0, 2))
    pack(paged, torch.arange(16), b, [0], chunk_size=16)
    assert torch.equal(a, b) and torch.equal(a, expected_arena(torch.zeros_like(a), cache, dims, kind,
                                                               torch.arange(16), [0], 16))
