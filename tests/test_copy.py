"""pack/unpack through the torch backend (and the reference) on every layout, bit-exact.

The Triton kernels get the same checks under TRITON_INTERPRET=1 in test_kernels_triton.py.
"""

import pytest
import torch

from gpukv.paged.copy import pack, resolve_backend, unpack
from gpukv.paged.layout import PagedKV
from gpukv.paged.planes import plane_views
from paged_cases import DTYPES, LAYOUTS, clone_layers, flat_bytes, make_cache, storages, token_rows

POISON = 0xA5


def _scattered_offsets(n, chunk_bytes, gap=48):
    """Chunks out of order with gaps, 16-byte aligned: [chunk n-1][gap][chunk n-2]..."""
    step = -(-(chunk_bytes + gap) // 16) * 16
    return [(n - 1 - i) * step for i in range(n)], n * step


def _arena(size):
    return torch.full((size,), POISON, dtype=torch.uint8)


def _round_trip(layout, backend, *, dtype=torch.bfloat16, num_chunks=3, chunk_size=16, block_size=16,
                num_layers=3, slot_dtype=torch.int64, holes=True, seed=0):
    num_blocks = max(8, -(-num_chunks * chunk_size // block_size) + 2)
    layers, dims, kind = make_cache(layout, dtype=dtype, num_layers=num_layers, num_blocks=num_blocks,
                                    block_size=block_size, seed=seed)
    paged = PagedKV.from_tensors(layers, dims, kind=kind)
    gen = torch.Generator().manual_seed(seed + 1)
    slots = torch.randperm(paged.num_slots, generator=gen)[: num_chunks * chunk_size].to(slot_dtype)
    if holes and slots.numel() > 5:
        slots[[1, 5]] = -1
    cb = paged.chunk_bytes(chunk_size)
    offsets, size = _scattered_offsets(num_chunks, cb)
    ref, got = _arena(size), _arena(size)
    pack(paged, slots, ref, offsets, chunk_size=chunk_size, backend="ref")
    pack(paged, slots, got, offsets, chunk_size=chunk_size, backend=backend)
    assert torch.equal(ref, got)
    # holes and gaps keep the poison; packed rows equal the pages' rows
    for c, off in enumerate(offsets):
        chunk = got[off:off + cb].view(paged.num_layers, paged.num_kv, chunk_size, paged.row_bytes)
        s = slots[c * chunk_size:(c + 1) * chunk_size].long()
        valid = s >= 0
        assert torch.equal(chunk[:, :, valid], token_rows(paged, s[valid]))
        assert bool((chunk[:, :, ~valid] == POISON).all())
    # unpack into a poisoned copy of the cache: the slots get the rows, every other byte is untouched
    dst_layers = clone_layers(layers)
    for t in storages(dst_layers):
        t.fill_(POISON)
    dst = PagedKV.from_tensors(dst_layers, dims, kind=kind)
    unpack(dst, slots, got, offsets, chunk_size=chunk_size, backend=backend)
    valid_slots = slots[slots >= 0].long()
    assert torch.equal(token_rows(dst, valid_slots), token_rows(paged, valid_slots))
    for v in plane_views(dst):  # put the poison back where rows landed: nothing else may differ
        v[valid_slots // dst.block_size, valid_slots % dst.block_size] = POISON
    assert all(bool((t == POISON).all()) for t in storages(dst_layers))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", ["torch", "ref"])
def test_round_trip_every_layout(layout, backend):
    _round_trip(layout, backend)


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32", "fp8", "u8"])
@pytest.mark.parametrize("layout", ["kv_first", "flashinfer_hnd", "packed", "mla"])
def test_round_trip_dtypes(layout, dtype):
    _round_trip(layout, "torch", dtype=DTYPES[dtype])


@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("num_chunks, num_layers", [(1, 1), (3, 5), (5, 3)])
def test_block_sizes_and_odd_counts(block_size, num_chunks, num_layers):
    _round_trip("blocks_first", "torch", block_size=block_size, num_chunks=num_chunks,
                num_layers=num_layers, chunk_size=32)


def test_int32_slots_and_no_holes():
    _round_trip("mla", "torch", slot_dtype=torch.int32, holes=False)


def test_fp8_ds_mla_656_byte_records():
    from paged_cases import random_bits

    gen = torch.Generator().manual_seed(3)
    layers = [random_bits((4, 64, 656), torch.uint8, gen) for _ in range(3)]
    paged = PagedKV.from_tensors(layers, "NB,BS,D", kind="mla")
    slots = torch.randperm(256, generator=gen)[:128]
    cb = paged.chunk_bytes(64)
    ref, got = _arena(2 * cb), _arena(2 * cb)
    pack(paged, slots, ref, [0, cb], chunk_size=64, backend="ref")
    pack(paged, slots, got, [0, cb], chunk_size=64, backend="torch")
    assert torch.equal(ref, got)


def test_all_slots_skipped_writes_nothing():
    layers, dims, kind = make_cache("mla")
    paged = PagedKV.from_tensors(layers, dims, kind=kind)
    arena = _arena(paged.chunk_bytes(16))
    pack(paged, torch.full((16,), -1), arena, [0], chunk_size=16, backend="torch")
    assert bool((arena == POISON).all())


def test_empty_call_is_a_no_op():
    layers, dims, kind = make_cache("kv_first")
    paged = PagedKV.from_tensors(layers, dims, kind=kind)
    arena = _arena(64)
    pack(paged, torch.empty(0, dtype=torch.int64), arena, [], chunk_size=16)
    unpack(paged, torch.empty(0, dtype=torch.int64), arena, torch.empty(0, dtype=torch.int64), chunk_size=16)
    assert bool((arena == POISON).all())


def _bad_call(**change):
    layers, dims, kind = make_cache("kv_first", num_blocks=4, block_size=16)
    paged = PagedKV.from_tensors(layers, dims, kind=kind)
    cb = paged.chunk_bytes(16)
    args = dict(paged=paged, slot_mapping=torch.arange(32), arena=_arena(2 * cb + 64), offsets=[0, cb],
                chunk_size=16)
    args.update(change)
    return layers, args


@pytest.mark.parametrize("change, message", [
    (dict(arena=torch.zeros(4096, dtype=torch.int8)), "arena must be a 1-D uint8 tensor"),
    (dict(arena=torch.zeros(64, 64, dtype=torch.uint8)), "arena must be a 1-D uint8 tensor"),
    (dict(arena=torch.zeros(8192, dtype=torch.uint8)[::2]), "arena must be contiguous"),
    (dict(offsets=[0, 1030]), "offset 1030 is not a multiple of 16"),
    (dict(offsets=[0, 16]), "overlap"),
    (dict(offsets=[0, 1 << 20]), "runs past the arena"),
    (dict(offsets=[-16, 4096]), "runs past the arena"),
    (dict(offsets=[0.5, 4096]), "offsets must be integers"),
    (dict(offsets=torch.zeros(2, 1, dtype=torch.int64)), "offsets must be a 1-D int64 tensor"),
    (dict(slot_mapping=torch.arange(31)), "slot_mapping has 31 entries, expected len(offsets) * chunk_size = 2 * 16 = 32"),
    (dict(slot_mapping=torch.arange(32).float()), "slot_mapping must be 1-D int64 or int32"),
    (dict(slot_mapping=torch.arange(32) + 40), "slot_mapping entry 71 is past the cache (64 slots"),
    (dict(slot_mapping=torch.arange(32) - 3), "slot_mapping entry -3 is below -1"),
    (dict(chunk_size=0), "chunk_size must be a positive int"),
    (dict(paged="pages"), "paged must be a PagedKV"),
])
@pytest.mark.parametrize("op", [pack, unpack])
def test_bad_input_raises_before_writing(op, change, message):
    layers, args = _bad_call(**change)
    arena = args["arena"]
    before_arena = arena.clone() if isinstance(arena, torch.Tensor) else None
    before_pages = flat_bytes(layers)
    with pytest.raises(ValueError, match=__import__("re").escape(message)):
        op(args.pop("paged"), args.pop("slot_mapping"), args.pop("arena"), args.pop("offsets"), **args)
    assert torch.equal(arena, before_arena)
    assert all(torch.equal(a, b) for a, b in zip(flat_bytes(layers), before_pages))


@pytest.mark.parametrize("name", ["arena", "slot_mapping", "offsets"])
@pytest.mark.parametrize("op", [pack, unpack])
def test_tensors_on_another_device_are_refused(op, name):
    layers, args = _bad_call()
    arena, before_pages = args["arena"], flat_bytes(layers)
    before_arena = arena.clone()
    moved = {"arena": arena, "slot_mapping": args["slot_mapping"],
             "offsets": torch.tensor(args["offsets"])}[name].to("meta")
    args[name] = moved
    with pytest.raises(ValueError, match=f"{name} is on meta, the paged cache on cpu"):
        op(args.pop("paged"), args.pop("slot_mapping"), args.pop("arena"), args.pop("offsets"), **args)
    assert torch.equal(arena, before_arena)
    assert all(torch.equal(a, b) for a, b in zip(flat_bytes(layers), before_pages))


def test_env_var_picks_the_backend(monkeypatch):
    layers, args = _bad_call()
    paged, slots, arena, offsets = (args.pop(k) for k in ("paged", "slot_mapping", "arena", "offsets"))
    monkeypatch.setenv("GPUKV_BACKEND", "no-such-backend")
    with pytest.raises(ValueError, match="backend must be one of"):
        pack(paged, slots, arena, offsets, chunk_size=16)
    assert bool((arena == POISON).all())
    monkeypatch.setenv("GPUKV_BACKEND", "ref")
    pack(paged, slots, arena, offsets, chunk_size=16)
    expected = _arena(arena.numel())
    pack(paged, slots, expected, offsets, chunk_size=16, backend="torch")
    assert torch.equal(arena, expected) and not bool((arena == POISON).all())


def test_backend_choice(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("GPUKV_BACKEND", raising=False)
    assert resolve_backend(None, cpu) == "torch"
    assert resolve_backend(None, torch.device("cuda")) == "triton"
    monkeypatch.setenv("GPUKV_BACKEND", "ref")
    assert resolve_backend(None, cpu) == "ref"
    assert resolve_backend("torch", cpu) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("cuda-magic", cpu)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", cpu)
