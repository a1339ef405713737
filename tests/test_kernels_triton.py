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
    (dict(word_bytes=3), "word_bytes must be 1, 2, 4 or 8"),
    (dict(head_bytes=12), "head_bytes=12 is not a multiple of word_bytes=8"),
    (dict(stride_token=True), "stride_token must be a non-negative int, got True"),
    (dict(num_blocks=0), "num_blocks must be positive"),
    (dict(chunk_size=-16), "chunk_size must be a non-negative int, got -16"),
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
