"""The torch (CPU) path's own mechanisms, each checked bit-exact against the oracle.

test_copy.py covers every layout and dtype through the public API; here: the unit plans (rows,
heads, words), whole-block chunks, arenas less aligned than the pages, stacked caches, thread
splits, and that pack never writes into the pages nor unpack outside its slots.
"""

import pytest
import torch

from gpukv.paged.copy import unpack
from gpukv.paged.layout import PagedKV
from gpukv.paged.units import unit_index, unit_views
from paged_cases import flat_bytes, make_cache, random_bits
from paged_oracle import check_pack_unpack, token_rows

POISON = 0x5A


def _whole_block_slots(num_blocks, block_size, num_chunks, chunk_size, seed=0):
    """Slots of whole blocks in random order, as a vLLM block table gives them."""
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.randperm(num_blocks, generator=gen)[: num_chunks * chunk_size // block_size]
    return (blocks[:, None] * block_size + torch.arange(block_size)).flatten()


def _check(layers, dims, kind, slots, *, chunk_size, arena_shift=0, layer_range=None):
    """pack and unpack through 'torch' equal the oracle byte for byte, and touch nothing else."""
    check_pack_unpack(layers, dims, kind, slots, backend="torch", chunk_size=chunk_size,
                      arena_shift=arena_shift, layer_range=layer_range)
    return PagedKV.from_tensors(layers, dims, kind=kind)


@pytest.mark.parametrize("layout, unit, per_row", [
    ("kv_first", "row", 1), ("blocks_first", "row", 1), ("mla", "row", 1), ("sglang_mha", "row", 1),
    ("kv_first_hnd", "head", 2), ("flashinfer_hnd", "head", 2), ("packed", "head", 2),
    ("cpu_split", "head", 2), ("mla_cpu", "row", 1), ("cross_blocks_outer", "row", 1),
])
def test_unit_is_the_largest_contiguous_piece_of_a_row(layout, unit, per_row):
    layers, dims, kind = make_cache(layout, num_blocks=5, block_size=16, heads=2, head_dim=8)
    paged = PagedKV.from_tensors(layers, dims, kind=kind)
    views = unit_views(paged)
    assert views.unit_bytes == (paged.row_bytes if unit == "row" else paged.head_bytes)
    assert views.units_per_row == per_row
    # unit_index names exactly the bytes of each token's row, for every slot (per the oracle)
    slots = torch.arange(paged.num_slots)
    idx = unit_index(paged, views, slots)
    want = token_rows(layers, dims, kind, slots)
    for plane, units in enumerate(views.planes):
        got = units.view(torch.uint8)[idx].reshape(paged.num_slots, -1)
        assert torch.equal(got, want[plane // paged.num_kv, plane % paged.num_kv])


def test_padded_heads_fall_back_to_word_units():
    # heads padded to 12 of 8 used values: head stride 24 B is no multiple of the 16 B head
    gen = torch.Generator().manual_seed(1)
    layers = [random_bits((2, 6, 16, 2, 12), torch.bfloat16, gen)[..., :8] for _ in range(3)]
    paged = _check(layers, "2,NB,BS,H,D", "mha", _slots(96, 48, holes=True), chunk_size=16)
    views = unit_views(paged)
    assert views.unit_bytes == paged.word_bytes == 8 and views.units_per_row == 4


@pytest.mark.parametrize("layout, block_size, chunk_size", [
    ("kv_first", 16, 32), ("mla", 64, 64), ("mla", 16, 48), ("blocks_first", 16, 32)])
def test_whole_block_chunks(layout, block_size, chunk_size):
    layers, dims, kind = make_cache(layout, num_blocks=9, block_size=block_size, num_layers=3)
    slots = _whole_block_slots(9, block_size, 3, chunk_size)
    _check(layers, dims, kind, slots, chunk_size=chunk_size)


def test_mixed_chunks_whole_blocks_runs_and_holes():
    layers, dims, kind = make_cache("kv_first", num_blocks=10, block_size=16, num_layers=3)
    whole = _whole_block_slots(10, 16, 1, 32)[:32]
    shifted = torch.arange(40, 72)  # consecutive, but starts mid-block
    holed = _whole_block_slots(10, 16, 1, 32, seed=5)[:32].clone()
    holed[7] = -1
    _check(layers, dims, kind, torch.cat([whole, shifted, holed]), chunk_size=32)


@pytest.mark.parametrize("shift", [1, 2, 4, 8])
@pytest.mark.parametrize("layout", ["kv_first", "flashinfer_hnd"])
def test_arena_less_aligned_than_the_pages(layout, shift):
    layers, dims, kind = make_cache(layout, num_blocks=6, block_size=16)
    _check(layers, dims, kind, _slots(96, 48, holes=True), chunk_size=16, arena_shift=shift)


def test_stacked_cache_and_int32_slots():
    gen = torch.Generator().manual_seed(2)
    stacked = random_bits((5, 4, 16, 576), torch.bfloat16, gen)  # 5 MLA layers in one tensor
    slots = _whole_block_slots(4, 16, 3, 16).to(torch.int32)
    _check(stacked, "NB,BS,D", "mla", slots, chunk_size=16)


@pytest.mark.parametrize("cpus", [8, 2])  # a thread that may run on 2 CPUs splits over 2
@pytest.mark.parametrize("use_native", [False, True])
@pytest.mark.parametrize("layout, num_groups", [
    ("kv_first", 5), ("flashinfer_hnd", 5), ("mla", 5), ("cross_kv_first", 1)])
def test_work_splits_over_threads(monkeypatch, layout, num_groups, use_native, cpus):
    import contextlib
    import threading

    import gpukv.paged.copy_torch as copy_torch
    from gpukv.paged import native

    compiled = native.native_copy()
    if use_native and compiled is None:
        pytest.skip("no C compiler")
    monkeypatch.setattr(copy_torch, "BYTES_PER_THREAD", 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    monkeypatch.setattr(copy_torch, "thread_cpus", lambda: cpus)
    calls = []  # (pack?, entries, thread) of every numpy piece and every compiled piece
    real_move = copy_torch._move_host
    monkeypatch.setattr(copy_torch, "_move_host", lambda work, to_arena: calls.append(
        (to_arena, len(work), threading.current_thread().name)) or real_move(work, to_arena))

    class Spy:
        batch = staticmethod(native.NativeCopy.batch)

        def run(self, batch, *, to_rows, nontemporal):
            if len(batch.counts):
                calls.append((to_rows, len(batch.counts), threading.current_thread().name))
            compiled.run(batch, to_rows=to_rows, nontemporal=nontemporal)

    if use_native:
        monkeypatch.setattr(copy_torch, "native_copy", Spy)
    layers, dims, kind = make_cache(layout, num_blocks=8, block_size=16, num_layers=5)
    whole = _whole_block_slots(8, 16, 1, 32)
    holed = _slots(128, 32, holes=True)  # (a chunk with -1 slots: always numpy's masked copy)
    with contextlib.nullcontext() if use_native else native.disabled():
        _check(layers, dims, kind, torch.cat([whole, holed]), chunk_size=32)
    work = 2 * num_groups  # (chunk, plane group) pairs
    threads = min(3, cpus, work)  # torch's threads, the calling thread's CPUs
    for to_arena in (True, False):  # pack, then unpack: cut in even pieces, each done once
        sizes = [n for op, n, _ in calls if op == to_arena and n]
        assert len(sizes) == min(work, 4 * threads) and sum(sizes) == work
        assert max(sizes) - min(sizes) <= 1
        names = {name for op, _, name in calls if op == to_arena}
        assert all(n == threading.current_thread().name or n.startswith("gpukv-copy") for n in names)


def test_a_stalled_thread_leaves_its_pieces_to_the_others():
    """One thread stalls on its piece (its core taken): the other takes every remaining piece."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from gpukv.paged.copy_torch import run_shared

    release, ran = threading.Event(), {}

    def piece(i):
        def run():
            if i == 0:
                assert release.wait(10), "the other thread never finished the rest"
            ran[i] = threading.current_thread().name
            if len(ran) == 5 and 0 not in ran:
                release.set()
        return run

    with ThreadPoolExecutor(1) as pool:
        run_shared([piece(i) for i in range(6)], pool, 2)
    assert sorted(ran) == list(range(6))
    assert len({ran[i] for i in range(1, 6)}) == 1 and ran[1] != ran[0]


@pytest.mark.parametrize("layout, unit_groups, block_groups", [
    ("kv_first", [(2, (0, 6 * 16))] * 3, [(2, (0, 6))] * 3),        # K and V of a layer tensor
    ("blocks_first", [(2, (0, 16))] * 3, [(2, (0, 1))] * 3),         # blocks interleave K and V
    ("cross_kv_first", [(6, tuple(range(0, 6 * 96, 96)))], [(6, tuple(range(0, 36, 6)))]),
    ("mla", [(1, (0,))] * 3, [(1, (0,))] * 3),                       # separate layer tensors
    ("cross_mla_dict", [(3, (0, 96, 192))], [(3, (0, 6, 12))]),      # one buffer: one group
    ("sglang_mha", [(1, (0,))] * 6, None),                           # K, V: separate pools
    ("flashinfer_hnd", [(2, (0, 32))] * 3, None),                    # head units, no whole blocks
    ("cpu_split", [(2, (0, 16))] * 3, None),
])
def test_planes_sharing_a_buffer_form_one_group(layout, unit_groups, block_groups):
    from gpukv.paged.groups import plane_groups

    layers, dims, kind = make_cache(layout, num_blocks=6, block_size=16, num_layers=3)
    paged = PagedKV.from_tensors(layers, dims, kind=kind)
    units = plane_groups(paged, "units")
    assert [(g.stop - g.first, g.plane_offsets) for g in units.groups] == unit_groups
    blocks = plane_groups(paged, "blocks")
    if block_groups is None:
        assert blocks is None
    else:
        assert [(g.stop - g.first, g.plane_offsets) for g in blocks.groups] == block_groups
        assert blocks.item_bytes == 16 * paged.row_bytes
    slots = torch.cat([_whole_block_slots(6, 16, 1, 32), _slots(96, 32, holes=True)])
    _check(layers, dims, kind, slots, chunk_size=32)
    _check(layers, dims, kind, slots, chunk_size=32, layer_range=(1, 3))


@pytest.mark.parametrize("use_native", [False, True])
def test_whole_block_chunks_move_whole_blocks(monkeypatch, use_native):
    import contextlib

    import gpukv.paged.copy_torch as copy_torch
    from gpukv.paged import native

    compiled = native.native_copy()
    if use_native and compiled is None:
        pytest.skip("no C compiler")
    seen = []  # (item bytes, items moved) of every entry, numpy's or the compiled loop's
    real_move = copy_torch._move_host
    monkeypatch.setattr(copy_torch, "_move_host", lambda work, to_arena: seen.extend(
        (w[0].dtype.itemsize, len(w[2])) for w in work) or real_move(work, to_arena))

    class Spy:
        def run(self, batch, *, to_rows, nontemporal):
            seen.extend((batch.item, int(n)) for n in batch.counts)
            compiled.run(batch, to_rows=to_rows, nontemporal=nontemporal)

    if use_native:
        monkeypatch.setattr(copy_torch, "native_copy", Spy)
    layers, dims, kind = make_cache("kv_first", num_blocks=6, block_size=16, num_layers=2)
    row = 2 * 8 * 2
    slots = torch.cat([_whole_block_slots(6, 16, 1, 32), torch.arange(8, 40)])  # 2nd: mid-block
    with contextlib.nullcontext() if use_native else native.disabled():
        _check(layers, dims, kind, slots, chunk_size=32)
    # per op, per layer group (K+V): chunk 0 as 2 planes x 2 blocks, chunk 1 as 2 planes x 32 rows
    assert sorted(seen) == sorted(([(16 * row, 4)] * 2 + [(row, 64)] * 2) * 2)


def test_a_busy_pool_does_not_hold_up_a_copy():
    """The pool's only thread is busy (another call's work): the caller takes every piece."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from gpukv.paged.copy_torch import run_shared

    busy, ran = threading.Event(), []
    with ThreadPoolExecutor(1) as pool:
        blocker = pool.submit(busy.wait, 10)
        run_shared([lambda i=i: ran.append((i, threading.current_thread().name)) for i in range(5)],
                   pool, 2)
        assert ran == [(i, threading.current_thread().name) for i in range(5)]
        busy.set()
        assert blocker.result() is True


def test_unpack_of_a_chunk_of_holes_writes_nothing():
    layers, dims, kind = make_cache("blocks_first", num_blocks=4)
    paged = PagedKV.from_tensors(layers, dims, kind=kind)
    before = flat_bytes(layers)
    arena = torch.zeros(paged.chunk_bytes(16), dtype=torch.uint8)
    unpack(paged, torch.full((16,), -1, dtype=torch.int64), arena, [0], chunk_size=16,
           backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(flat_bytes(layers), before))


def _slots(num_slots, n, *, holes, seed=3):
    gen = torch.Generator().manual_seed(seed)
    slots = torch.randperm(num_slots, generator=gen)[:n]
    if holes:
        slots[[2, n - 1]] = -1
    return slots


def test_pack_streams_into_the_arena_and_unpack_only_large_calls():
    from gpukv.paged.copy_torch import STREAM_UNPACK_BYTES as big, nontemporal

    assert nontemporal(True, 1) and nontemporal(True, 1 << 40)  # pack: always
    assert nontemporal(False, big) and nontemporal(False, 1 << 40)
    assert not nontemporal(False, big - 1)  # a small call's pages may stay cached for attention


@pytest.mark.parametrize("streaming", ["default", "everywhere"])
@pytest.mark.parametrize("layout", ["kv_first", "mla", "cpu_split", "cross_kv_first", "flashinfer_hnd"])
def test_the_compiled_loop_streams_as_told_and_stays_bit_exact(monkeypatch, layout, streaming):
    """Every compiled call is told to stream when packing; unpacking only past the thresholds
    (lowered to nothing here for "everywhere"); the bytes equal the oracle either way, with an
    arena off the line size (partial lines at the items' ends)."""
    import gpukv.paged.copy_torch as copy_torch
    from gpukv.paged import native

    compiled = native.native_copy()
    if compiled is None:
        pytest.skip("no C compiler")
    if streaming == "everywhere":
        monkeypatch.setattr(copy_torch, "STREAM_UNPACK_BYTES", 0)
    told = []  # (pack?, nontemporal) of every compiled call

    class Spy:
        batch = staticmethod(native.NativeCopy.batch)

        def run(self, batch, *, to_rows, nontemporal):
            told.append((to_rows, nontemporal))
            compiled.run(batch, to_rows=to_rows, nontemporal=nontemporal)

    monkeypatch.setattr(copy_torch, "native_copy", Spy)
    layers, dims, kind = make_cache(layout, num_blocks=8, block_size=16, num_layers=3)
    slots = torch.cat([_whole_block_slots(8, 16, 2, 32), _slots(128, 32, holes=False)])
    _check(layers, dims, kind, slots, chunk_size=32, arena_shift=8)
    assert {op for op, _ in told} == {True, False}
    assert all(nt for op, nt in told if op)
    assert all(nt is (streaming == "everywhere") for op, nt in told if not op)
