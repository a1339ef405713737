"""The Triton kernel module on its own: raw arguments (no PagedKV), its launcher's checks, and
the kernel against its plain-torch reference ``paged_copy_ref``, bit-exact.

Every layout, dtype, block size and layer range through the public API (all backends, against an
oracle independent of PagedKV) is in test_copy.py and test_copy_layers.py. Without a GPU the
kernel runs under TRITON_INTERPRET=1 on CPU tensors, so shapes stay tiny. The interpreter is
chosen when the kernels are first imported, so it is set here before anything imports triton
(importing torch does not). With ``GPUKV_TRITON_COMPILED=1`` (perf/gpu_check.sh sets it) the
same tests run compiled on the GPU.
"""

import os

import torch  # does not import triton

COMPILED = os.environ.get("GPUKV_TRITON_COMPILED") == "1" or (
    torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1")
if not COMPILED:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from gpukv.paged.copy import pack, unpack  # noqa: E402
from gpukv.paged.layout import PagedKV  # noqa: E402
from paged_cases import make_cache  # noqa: E402

DEVICE = "cuda" if COMPILED else "cpu"
POISON = 0x3C

if COMPILED and not torch.cuda.is_available():
    pytest.skip("GPUKV_TRITON_COMPILED=1 needs a CUDA device", allow_module_level=True)


def test_bad_input_raises_before_launch():
    layers, dims, kind = make_cache("kv_first", device=DEVICE)
    paged = PagedKV.from_tensors(layers, dims, kind=kind)
    arena = torch.full((4 * paged.chunk_bytes(16),), POISON, dtype=torch.uint8, device=DEVICE)
    with pytest.raises(ValueError, match="is past the cache"):
        pack(paged, torch.arange(16, device=DEVICE) + paged.num_slots, arena, [0], chunk_size=16,
             backend="triton")
    with pytest.raises(ValueError, match="not a multiple of 16"):
        unpack(paged, torch.arange(16, device=DEVICE), arena, [8], chunk_size=16, backend="triton")
    assert bool((arena == POISON).all())


def test_kernels_run_in_the_mode_this_file_chose():
    from triton.runtime.interpreter import InterpretedFunction

    from gpukv_kernels.paged_copy import paged_copy_kernel

    # a module that imported gpukv_kernels before this file would have fixed the mode already
    assert isinstance(paged_copy_kernel, InterpretedFunction) == (not COMPILED)


def _raw_case(num_planes=3, num_blocks=4, block_size=16, heads=2, head_bytes=16, num_chunks=2,
              chunk_size=16):
    """Raw kernel arguments without gpukv: planes in separate tensors, HND-like strides."""
    gen = torch.Generator().manual_seed(11)
    pages = [torch.randint(0, 256, (num_blocks, heads, block_size, head_bytes), dtype=torch.uint8,
                           generator=gen).to(DEVICE) for _ in range(num_planes)]
    table = torch.tensor([p.data_ptr() for p in pages], dtype=torch.int64, device=DEVICE)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[: num_chunks * chunk_size]
    slots[[2, 9]] = -1
    row = heads * head_bytes
    chunk = num_planes * chunk_size * row
    offsets = torch.tensor([chunk + 64, 0], dtype=torch.int64)[:num_chunks]
    arena = torch.full((2 * chunk + 64,), POISON, dtype=torch.uint8, device=DEVICE)
    args = dict(num_blocks=num_blocks, block_size=block_size, chunk_size=chunk_size, num_kv=1,
                num_heads=heads, head_bytes=head_bytes, stride_block=heads * block_size * head_bytes,
                stride_token=head_bytes, stride_head=block_size * head_bytes, layer_start=0,
                layer_stop=num_planes, word_bytes=8)
    return pages, table, slots.to(DEVICE), offsets, arena, args


def test_raw_kernel_equals_its_reference_both_ways():
    from gpukv_kernels.paged_copy import paged_copy, paged_copy_ref

    pages, table, slots, offsets, arena, args = _raw_case()
    want = arena.clone()
    paged_copy_ref(table, slots, offsets, want, pack=True, **args)
    paged_copy(table, slots, offsets, arena, pack=True, **args)
    assert torch.equal(arena.cpu(), want.cpu())
    # token 0 of chunk 1 (offset 0) in plane 0: its slot's row, heads in order
    b, p = divmod(int(slots[16]), 16)
    assert torch.equal(arena[:32].cpu(), pages[0][b, :, p].reshape(-1).cpu())
    # unpack into poisoned pages through the reference, then through the kernel: the same bytes
    originals = [p.clone() for p in pages]
    for p in pages:
        p.fill_(POISON)
    paged_copy_ref(table, slots, offsets, arena, pack=False, **args)
    want_pages = [p.clone() for p in pages]
    for p in pages:
        p.fill_(POISON)
    paged_copy(table, slots, offsets, arena, pack=False, **args)
    assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(pages, want_pages))
    valid = slots[slots >= 0].cpu()  # valid slots got their rows back, everything else is poison
    for got, orig in zip(pages, originals):
        got, orig = got.cpu(), orig.cpu()
        assert torch.equal(got[valid // 16, :, valid % 16], orig[valid // 16, :, valid % 16])
        got[valid // 16, :, valid % 16] = POISON
        assert bool((got == POISON).all())


@pytest.mark.parametrize("change, message", [
    (dict(table=torch.zeros(3, dtype=torch.int32)), "table must be a 1-D torch.int64 tensor"),
    (dict(slots=torch.zeros(32, dtype=torch.int32)), "slots must be a 1-D torch.int64 tensor"),
    (dict(arena=torch.zeros(8, 8, dtype=torch.uint8)), "arena must be a 1-D torch.uint8 tensor"),
    (dict(offsets=torch.zeros(3, dtype=torch.int64)), "slots has 32 entries, expected len(offsets) * chunk_size = 3 * 16"),
    (dict(layer_start=2, layer_stop=2), "layers [2, 2) are not a non-empty range of the 3 layers"),
    (dict(layer_stop=4), "layers [0, 4) are not a non-empty range"),
    (dict(num_kv=2), "table has 3 planes, not a multiple of num_kv=2"),
    (dict(word_bytes=3), "word_bytes must be 16, 8, 4, 2 or 1, got 3"),
    (dict(head_bytes=12), "head_bytes=12 is not a multiple of word_bytes=8"),
    (dict(stride_token=True), "stride_token must be a non-negative int, got True"),
    (dict(num_blocks=0), "num_blocks must be positive"),
    (dict(chunk_size=-16), "chunk_size must be a non-negative int, got -16"),
    (dict(sm_budget=0), "sm_budget must be a positive int (SMs' worth of CTAs) or None (every SM), got 0"),
])
@pytest.mark.parametrize("ref", [False, True])
def test_raw_launcher_validates_before_launching(change, message, ref):
    from gpukv_kernels.paged_copy import paged_copy, paged_copy_ref

    pages, table, slots, offsets, arena, args = _raw_case()
    tensors, change = dict(table=table, slots=slots, offsets=offsets, arena=arena), dict(change)
    for key in list(change):
        if key in tensors:
            tensors[key] = change.pop(key).to(DEVICE) if key != "offsets" else change.pop(key)
    args.update(change)
    before = arena.clone()
    fn = paged_copy_ref if ref else paged_copy
    with pytest.raises(ValueError, match=__import__("re").escape(message)):
        fn(tensors["table"], tensors["slots"], tensors["offsets"], tensors["arena"], pack=True, **args)
    assert torch.equal(arena.cpu(), before.cpu())


# -- every specialization the launch plan picks, against the reference, bit-exact ---------------

def _aligned(nbytes: int, misalign: int, gen: torch.Generator) -> torch.Tensor:
    """Random bytes starting ``misalign`` bytes past a 16-byte boundary (on DEVICE)."""
    raw = torch.randint(0, 256, (nbytes + 32,), dtype=torch.uint8, generator=gen).to(DEVICE)
    start = (-raw.data_ptr()) % 16 + misalign
    return raw[start:start + nbytes]


def _spec_case(*, num_planes=4, num_kv=2, num_blocks=5, block_size=16, heads=3, head_bytes=48,
               hnd=True, misalign=0, chunk_size=16, num_chunks=2, seed=5):
    """Raw arguments over planes in separate buffers (HND or NHD), ``misalign`` bytes off a
    16-byte boundary; slots random with holes; chunks at 16-aligned offsets with a gap."""
    gen = torch.Generator().manual_seed(seed)
    shape = (num_blocks, heads, block_size, head_bytes) if hnd else (num_blocks, block_size, heads, head_bytes)
    n = num_blocks * block_size * heads * head_bytes
    pages = [_aligned(n, misalign, gen).view(shape) for _ in range(num_planes)]
    table = torch.tensor([p.data_ptr() for p in pages], dtype=torch.int64, device=DEVICE)
    num_tokens = num_chunks * chunk_size
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[torch.randperm(num_tokens, generator=gen)[: num_tokens // 5]] = -1
    row = heads * head_bytes
    chunk = num_planes * chunk_size * row
    step = -(-chunk // 16) * 16 + 32
    offsets = torch.tensor([step * (num_chunks - 1 - c) for c in range(num_chunks)], dtype=torch.int64)
    arena = _aligned(step * num_chunks, misalign if misalign in (2, 8) else 0, gen)
    arena.fill_(POISON)
    strides = ((heads * block_size * head_bytes, head_bytes, block_size * head_bytes) if hnd
               else (block_size * heads * head_bytes, heads * head_bytes, head_bytes))
    values = [head_bytes, *strides, arena.data_ptr(), *(p.data_ptr() for p in pages), 16]
    word = next(w for w in (16, 8, 4, 2, 1) if all(v % w == 0 for v in values))
    args = dict(num_blocks=num_blocks, block_size=block_size, chunk_size=chunk_size, num_kv=num_kv,
                num_heads=heads, head_bytes=head_bytes, stride_block=strides[0],
                stride_token=strides[1], stride_head=strides[2], layer_start=0,
                layer_stop=num_planes // num_kv, word_bytes=word)
    return pages, table, slots.to(DEVICE), offsets.to(DEVICE), arena, args


def _kernel_equals_reference(pages, table, slots, offsets, arena, args, **launch):
    """Pack into a poisoned arena and unpack into poisoned pages, kernel vs reference: every
    byte of the arena and of the pages equal."""
    from gpukv_kernels.paged_copy import paged_copy, paged_copy_ref

    want = arena.clone()
    paged_copy_ref(table, slots, offsets, want, pack=True, **args)
    paged_copy(table, slots, offsets, arena, pack=True, **args, **launch)
    assert torch.equal(arena.cpu(), want.cpu())
    assert not bool((arena == POISON).all())  # something moved
    for p in pages:
        p.fill_(POISON)
    paged_copy_ref(table, slots, offsets, arena, pack=False, **args)
    want_pages = [p.clone() for p in pages]
    for p in pages:
        p.fill_(POISON)
    paged_copy(table, slots, offsets, arena, pack=False, **args, **launch)
    assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(pages, want_pages))


@pytest.mark.parametrize("misalign, head_bytes, word", [
    (0, 48, 16),  # 16-byte vectors
    (8, 48, 8),  # int64 words
    (0, 40, 8),  # heads of 40 bytes: 8-byte words even where the buffers are 16-aligned
    (2, 18, 2),  # int16 words
    (0, 7, 1),  # bytes
])
@pytest.mark.parametrize("hnd", [True, False])
def test_vector_and_word_paths(misalign, head_bytes, word, hnd):
    case = _spec_case(misalign=misalign, head_bytes=head_bytes, hnd=hnd)
    assert case[-1]["word_bytes"] == word
    _kernel_equals_reference(*case)


@pytest.mark.parametrize("sm_budget", [1, 3, None])
def test_grid_stride_with_fewer_programs_than_items(sm_budget):
    from gpukv_kernels.paged_copy import kernel_launch

    case = _spec_case(num_chunks=3)
    launch = kernel_launch(*case[1:5], pack=True, sm_budget=sm_budget, sm_count=None, **case[5])
    assert launch.plan.num_items == 3 * 4  # chunks x planes, one item each
    assert launch.grid == (min(sm_budget or 12, 12),)
    _kernel_equals_reference(*case, sm_budget=sm_budget)


def test_segments_of_several_items_with_a_partial_last_one():
    from gpukv_kernels.paged_copy import kernel_launch

    # rows of 512 B = 32 vectors; 160 tokens = 5120 vectors per plane and chunk: items of 4096
    case = _spec_case(num_blocks=12, heads=2, head_bytes=256, chunk_size=160, num_chunks=1,
                      num_planes=2, hnd=False)
    plan = kernel_launch(*case[1:5], pack=True, sm_budget=2, sm_count=None, **case[5]).plan
    assert (plan.items_per_segment, plan.num_items, plan.step) == (2, 4, 4096)
    _kernel_equals_reference(*case, sm_budget=2)


@pytest.mark.parametrize("block_size, slot_div", [(16, 4), (1, 0), (12, "DIV32"), (12, "DIV64")])
def test_slot_division_paths(block_size, slot_div, monkeypatch):
    import gpukv_kernels.paged_copy_plan as plan_module
    from gpukv_kernels.paged_copy import kernel_launch

    if slot_div == "DIV64":  # a cache of 2**31 slots, as far as the plan can tell
        monkeypatch.setattr(plan_module, "INT32_MAX", 10)
    case = _spec_case(block_size=block_size, num_blocks=max(5, 80 // block_size))
    plan = kernel_launch(*case[1:5], pack=True, sm_budget=None, sm_count=None, **case[5]).plan
    assert plan.slot_div == (getattr(plan_module, slot_div) if isinstance(slot_div, str) else slot_div)
    _kernel_equals_reference(*case)


@pytest.mark.parametrize("chunk_size, layers", [(5, (0, 2)), (7, (1, 2)), (16, (0, 1))])
def test_odd_chunk_sizes_and_layer_ranges(chunk_size, layers):
    pages, table, slots, offsets, arena, args = _spec_case(chunk_size=chunk_size, num_chunks=3)
    args.update(layer_start=layers[0], layer_stop=layers[1])
    _kernel_equals_reference(pages, table, slots, offsets, arena, args)
    # the layers outside the range kept their poison in every chunk
    row = args["num_heads"] * args["head_bytes"]
    layer_bytes = 2 * chunk_size * row
    for off in offsets.tolist():
        chunk = arena[off:off + 2 * layer_bytes].cpu()
        for layer in set(range(2)) - set(range(*layers)):
            assert bool((chunk[layer * layer_bytes:(layer + 1) * layer_bytes] == POISON).all())


def test_all_holes_write_nothing():
    from gpukv_kernels.paged_copy import paged_copy

    pages, table, slots, offsets, arena, args = _spec_case()
    slots.fill_(-1)
    before = [p.clone() for p in pages]
    paged_copy(table, slots, offsets, arena, pack=True, **args)
    assert bool((arena == POISON).all())
    arena.fill_(7)
    paged_copy(table, slots, offsets, arena, pack=False, **args)
    assert all(torch.equal(a, b) for a, b in zip(pages, before))


def test_launcher_reads_no_device_value_and_launches_its_plan(monkeypatch):
    """The launcher must not synchronize the host: no .item/.tolist/.cpu/.to/... on any tensor
    between the checks and the launch; and it launches exactly what ``kernel_launch`` plans."""
    from torch.overrides import TorchFunctionMode

    import gpukv_kernels.paged_copy as kernel_module

    pages, table, slots, offsets, arena, args = _spec_case()
    syncing = {"item", "tolist", "cpu", "numpy", "to", "__bool__", "__int__", "__index__",
               "__float__", "copy_", "nonzero", "any", "all", "equal", "min", "max"}
    called, launched = [], []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, a=(), kw=None):
            called.append(getattr(func, "__name__", str(func)))
            return func(*a, **(kw or {}))

    kernel = kernel_module.paged_copy_kernel
    monkeypatch.setattr(kernel, "run", lambda *a, grid, warmup, **k: launched.append((grid, a, k)))
    with Record():
        kernel_module.paged_copy(table, slots, offsets, arena, pack=False, sm_budget=3, **args)
    assert launched and not syncing & set(called), sorted(syncing & set(called))
    want = kernel_module.kernel_launch(table, slots, offsets, arena, pack=False, sm_budget=3,
                                       sm_count=None, **args)
    (grid, got_args, got_kwargs), = launched
    assert grid == want.grid and got_kwargs == want.kwargs
    assert [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in got_args] == \
        [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in want.args]


def test_offsets_and_slots_must_already_be_on_the_arena_device():
    if DEVICE == "cpu":
        pytest.skip("needs a second device kind: on CPU every tensor is on the arena's device")
    from gpukv_kernels.paged_copy import paged_copy

    pages, table, slots, offsets, arena, args = _spec_case()
    with pytest.raises(ValueError, match="offsets is on cpu"):
        paged_copy(table, slots, offsets.cpu(), arena, pack=True, **args)
