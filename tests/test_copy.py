"""pack/unpack through the public API on every backend, checked against the oracle.

The oracle (tests/paged_oracle.py) indexes the ORIGINAL tensors per dims string with plain torch
indexing; nothing here trusts PagedKV's own views. Every byte of the arena and of the pages is
compared: outputs are poisoned first, so rows that should stay untouched (``-1`` slots, gaps
between chunks, other layers) show. The Triton backend runs under TRITON_INTERPRET=1 on CPU at
these tiny shapes, and compiled on a GPU with ``GPUKV_TRITON_COMPILED=1``.
"""

import pytest
import torch

from gpukv.paged.copy import pack, resolve_backend, unpack
from gpukv.paged.layout import PagedKV
from paged_cases import CROSS_LAYER, DTYPES, LAYOUTS, backend_devices, flat_bytes, make_cache, random_bits
from paged_oracle import POISON, check_pack_unpack

BACKENDS = backend_devices()


def _random_slots(num_slots, n, *, seed=1, holes=True, dtype=torch.int64):
    """Random token slots (any order, any block), two of them -1."""
    slots = torch.randperm(num_slots, generator=torch.Generator().manual_seed(seed))[:n]
    if holes and n > 5:
        slots[[1, 5]] = -1
    return slots.to(dtype)


def _block_table_slots(num_blocks, block_size, n, *, seed=2):
    """Whole blocks in random order, as a vLLM block table gives them."""
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.randperm(num_blocks, generator=gen)[: n // block_size]
    return (blocks[:, None] * block_size + torch.arange(block_size)).flatten()


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS + CROSS_LAYER)
def test_every_layout_random_slots(layout, backend, device):
    layers, dims, kind = make_cache(layout, num_layers=3, num_blocks=6, device=device)
    check_pack_unpack(layers, dims, kind, _random_slots(96, 48), backend=backend, chunk_size=16)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("layout", ["kv_first", "flashinfer_hnd", "cross_blocks_outer", "cpu_split", "mla"])
def test_every_layout_block_table_slots(layout, backend, device):
    layers, dims, kind = make_cache(layout, num_layers=2, num_blocks=8, device=device)
    check_pack_unpack(layers, dims, kind, _block_table_slots(8, 16, 64), backend=backend, chunk_size=32)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("block_size", [16, 32, 64, 128])
@pytest.mark.parametrize("layout", ["cross_kv_first", "cross_cpu_split", "cross_mla_dict", "packed"])
def test_block_sizes(layout, block_size, backend, device):
    layers, dims, kind = make_cache(layout, num_layers=2, num_blocks=3, block_size=block_size,
                                    heads=2, head_dim=4, device=device)
    slots = torch.cat([_block_table_slots(3, block_size, block_size),
                       _random_slots(3 * block_size, block_size, seed=block_size)])
    check_pack_unpack(layers, dims, kind, slots, backend=backend, chunk_size=block_size)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32", "fp8", "u8"])
@pytest.mark.parametrize("layout", ["kv_first_hnd", "cpu_split", "mla"])
def test_dtypes(layout, dtype, backend, device):
    layers, dims, kind = make_cache(layout, dtype=DTYPES[dtype], num_layers=2, num_blocks=4,
                                    device=device)
    check_pack_unpack(layers, dims, kind, _random_slots(64, 32), backend=backend, chunk_size=16)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("layout", ["mla", "cross_mla_dict"])
def test_fp8_ds_mla_656_byte_records(layout, backend, device):
    layers, dims, kind = make_cache(layout, dtype=torch.uint8, num_layers=2, num_blocks=3,
                                    block_size=64, heads=1, head_dim=656, device=device)
    slots = torch.cat([_block_table_slots(3, 64, 64), _random_slots(192, 64)])
    check_pack_unpack(layers, dims, kind, slots, backend=backend, chunk_size=64)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_int32_and_int64_slots(slot_dtype, backend, device):
    layers, dims, kind = make_cache("flashinfer_hnd", num_layers=2, device=device)
    check_pack_unpack(layers, dims, kind, _random_slots(96, 32, dtype=slot_dtype), backend=backend,
                      chunk_size=16)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("layout", ["kv_first", "mla", "sglang_mha"])
def test_chunk_of_all_holes_writes_nothing(layout, backend, device):
    layers, dims, kind = make_cache(layout, num_layers=2, device=device)
    slots = torch.cat([torch.full((16,), -1), _random_slots(96, 16, holes=False)])
    check_pack_unpack(layers, dims, kind, slots, backend=backend, chunk_size=16)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("shift", [1, 2, 4, 8])
def test_arena_less_aligned_than_the_pages(shift, backend, device):
    layers, dims, kind = make_cache("kv_first_hnd", num_layers=2, device=device)
    check_pack_unpack(layers, dims, kind, _random_slots(96, 32), backend=backend, chunk_size=16,
                      arena_shift=shift)


@pytest.mark.parametrize("backend, device", BACKENDS)
def test_empty_call_is_a_no_op(backend, device):
    layers, dims, kind = make_cache("kv_first", device=device)
    paged = PagedKV.from_tensors(layers, dims, kind=kind)
    arena = torch.full((64,), POISON, dtype=torch.uint8, device=device)
    pages = flat_bytes(layers)
    for op in (pack, unpack):
        op(paged, torch.empty(0, dtype=torch.int64), arena, [], chunk_size=16, backend=backend)
        op(paged, torch.empty(0, dtype=torch.int32), arena, torch.empty(0, dtype=torch.int64),
           chunk_size=16, backend=backend, layers=(1, 2))
    assert bool((arena == POISON).all())
    assert all(torch.equal(a, b) for a, b in zip(flat_bytes(layers), pages))


def _bad_call(**change):
    layers, dims, kind = make_cache("kv_first", num_blocks=4, block_size=16)
    paged = PagedKV.from_tensors(layers, dims, kind=kind)
    cb = paged.chunk_bytes(16)
    args = dict(paged=paged, slot_mapping=torch.arange(32),
                arena=torch.full((2 * cb + 64,), POISON, dtype=torch.uint8), offsets=[0, cb],
                chunk_size=16)
    args.update(change)
    return layers, args


@pytest.mark.parametrize("change, message", [
    (dict(arena=torch.zeros(4096, dtype=torch.int8)), "arena must be a 1-D uint8 tensor"),
    (dict(arena=torch.zeros(64, 64, dtype=torch.uint8)), "arena must be a 1-D uint8 tensor"),
    (dict(arena=torch.zeros(8192, dtype=torch.uint8)[::2]), "arena must be contiguous"),
    (dict(arena="arena"), "arena must be a 1-D uint8 tensor, got str"),
    (dict(offsets=[0, 1030]), "offset 1030 is not a multiple of 16"),
    (dict(offsets=[0, 16]), "overlap"),
    (dict(offsets=[0, 1 << 20]), "runs past the arena"),
    (dict(offsets=[-16, 4096]), "runs past the arena"),
    (dict(offsets=[0.5, 4096]), "offsets must be integers"),
    (dict(offsets=[True, 4096]), "offsets must be integers"),
    (dict(offsets=None), "offsets must be a 1-D tensor or a sequence of ints"),
    (dict(offsets=torch.zeros(2, 1, dtype=torch.int64)), "offsets must be a 1-D int64 tensor"),
    (dict(slot_mapping=torch.arange(31)), "slot_mapping has 31 entries, expected len(offsets) * chunk_size = 2 * 16 = 32"),
    (dict(slot_mapping=torch.arange(32).float()), "slot_mapping must be 1-D int64 or int32"),
    (dict(slot_mapping=list(range(32))), "slot_mapping must be a torch.Tensor, got list"),
    (dict(slot_mapping=torch.arange(32) + 40), "slot_mapping entry 71 is past the cache (64 slots"),
    (dict(slot_mapping=torch.arange(32) - 3), "slot_mapping entry -3 is below -1"),
    (dict(chunk_size=0), "chunk_size must be a positive int"),
    (dict(chunk_size=True), "chunk_size must be a positive int, got True"),
    (dict(paged="pages"), "paged must be a PagedKV"),
    (dict(backend="cuda-magic"), "backend must be one of"),
    (dict(layers=(0, 9)), "layers (0, 9) is not a non-empty range inside [0, 3)"),
])
@pytest.mark.parametrize("op", [pack, unpack])
def test_bad_input_raises_before_writing(op, change, message):
    layers, args = _bad_call(**change)
    arena = args["arena"]
    before_arena = arena.clone() if isinstance(arena, torch.Tensor) else None
    before_pages = flat_bytes(layers)
    with pytest.raises(ValueError, match=__import__("re").escape(message)):
        op(args.pop("paged"), args.pop("slot_mapping"), args.pop("arena"), args.pop("offsets"), **args)
    if before_arena is not None:
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
    calls = []
    import gpukv_kernels.paged_copy as kernel_module

    real = kernel_module.paged_copy_ref
    monkeypatch.setattr(kernel_module, "paged_copy_ref", lambda *a, **k: calls.append(1) or real(*a, **k))
    pack(paged, slots, arena, offsets, chunk_size=16)
    expected = torch.full_like(arena, POISON)
    pack(paged, slots, expected, offsets, chunk_size=16, backend="torch")
    assert calls == [1] and torch.equal(arena, expected) and not bool((arena == POISON).all())


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


def test_top_level_exports_are_the_paged_api():
    import gpukv
    from gpukv.paged import copy, layout

    assert gpukv.PagedKV is layout.PagedKV and gpukv.pack is copy.pack and gpukv.unpack is copy.unpack
    gen = torch.Generator().manual_seed(4)
    layers = [random_bits((4, 16, 64), torch.bfloat16, gen) for _ in range(2)]
    check_pack_unpack(layers, "NB,BS,D", "mla", torch.arange(32), backend="torch", chunk_size=16)
