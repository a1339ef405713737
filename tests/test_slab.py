"""SlabArena: aligned fixed-size slots in slabs carved from one arena, O(1) alloc/free, reuse."""

from __future__ import annotations

import pytest
import torch

from gpukv.l1.slab import ALIGN_BYTES, SlabArena, aligned_bytes


def test_aligned_bytes_rounds_up_to_256():
    assert [aligned_bytes(n) for n in (1, 255, 256, 257, 1000, 1024)] == [256, 256, 256, 512, 1024, 1024]


@pytest.mark.parametrize("capacity, slab_bytes", [(100, 4096), (4096, 100), (4096.0, 4096)])
def test_bad_sizes_raise_naming_the_value(capacity, slab_bytes):
    with pytest.raises(ValueError, match=str(capacity if capacity != 4096 else slab_bytes)):
        SlabArena(capacity, slab_bytes=slab_bytes)


def test_arena_is_one_uint8_tensor_of_the_capacity():
    slab = SlabArena(10_000)
    assert slab.arena.dtype == torch.uint8 and slab.arena.shape == (10_000,)
    assert slab.capacity_bytes == 10_000 and slab.used_bytes == 0 and slab.num_slabs == 0


@pytest.mark.parametrize("slab_bytes, num_slabs", [(None, 3), (4 << 20, 1)])
def test_capacity_of_exactly_k_slots_holds_k(slab_bytes, num_slabs):
    # Default: slabs are capped at capacity // 16, here one slot each. A 4 MiB slab would not
    # fit the arena, so one partial slab takes all 3 slots.
    slab = SlabArena(3 * 1024, slab_bytes=slab_bytes)
    offsets = [slab.alloc(1024) for _ in range(3)]
    assert offsets == [0, 1024, 2048]
    assert slab.alloc(1024) is None
    assert slab.used_bytes == 3 * 1024 and slab.num_slabs == num_slabs


def test_default_slab_size_is_4_mib_capped_at_a_sixteenth_of_the_arena():
    assert SlabArena(64 << 20, device="meta").slab_bytes == 4 << 20
    assert SlabArena(16 << 20, device="meta").slab_bytes == 1 << 20
    assert SlabArena(1024).slab_bytes == 256


def test_full_slabs_then_a_partial_last_slab():
    # 4 slots per full slab; 10 slots of capacity -> slabs of 4, 4 and a partial 2.
    slab = SlabArena(10 * 1024, slab_bytes=4 * 1024)
    offsets = [slab.alloc(1024) for _ in range(10)]
    assert offsets == [i * 1024 for i in range(10)]
    assert all(off % ALIGN_BYTES == 0 for off in offsets)
    assert [s.num_slots for s in sorted(slab.slabs(), key=lambda s: s.start)] == [4, 4, 2]
    assert slab.alloc(1024) is None
    assert slab.free_ranges == []


def test_freed_slot_is_reused_first_and_slab_stays_while_not_empty():
    slab = SlabArena(8 * 1024, slab_bytes=4 * 1024)
    a, b, c = (slab.alloc(1024) for _ in range(3))
    assert slab.free(b) is False  # slab still holds a and c
    assert slab.used_bytes == 2 * 1024
    assert slab.slab_of(a).used_offsets() == [a, c]
    assert slab.alloc(1024) == b  # LIFO reuse of the freed slot, no new slab
    assert slab.num_slabs == 1


def test_empty_slab_goes_back_to_the_arena_for_another_class():
    # The whole arena is two 4 KiB slabs of 1 KiB slots; nothing is left for a 2 KiB class.
    slab = SlabArena(8 * 1024, slab_bytes=4 * 1024)
    small = [slab.alloc(1024) for _ in range(8)]
    assert slab.alloc(2048) is None and slab.num_slabs == 2
    for off in small[4:]:  # empty the second slab only
        slab.free(off)
    assert slab.num_slabs == 1 and slab.free_ranges == [(4096, 8192)]
    assert slab.has_free_slot(2048) is False
    big = [slab.alloc(2048) for _ in range(2)]
    assert big == [4096, 6144] and slab.alloc(2048) is None
    assert slab.has_free_slot(1024) is False
    assert slab.used_bytes == 4 * 1024 + 2 * 2048


def test_freed_slabs_coalesce_into_one_range():
    slab = SlabArena(12 * 1024, slab_bytes=4 * 1024)
    offsets = [slab.alloc(1024) for _ in range(12)]  # three slabs of four
    for group in (offsets[0:4], offsets[8:12], offsets[4:8]):  # left, right, then middle
        for off in group:
            slab.free(off)
    assert slab.free_ranges == [(0, 12 * 1024)]
    assert slab.num_slabs == 0 and slab.used_bytes == 0
    # A class whose slot is the whole arena now fits.
    assert slab.alloc(12 * 1024) == 0


def test_object_larger_than_the_slab_size_gets_a_slab_of_one_slot():
    slab = SlabArena(3 * 8192, slab_bytes=4096)
    assert [slab.alloc(8192) for _ in range(4)] == [0, 8192, 16384, None]
    assert [s.num_slots for s in slab.slabs(8192)] == [1, 1, 1]


def test_capacity_tail_below_alignment_is_unused():
    slab = SlabArena(1024 + 100)
    assert slab.alloc(1024) == 0
    assert slab.alloc(256) is None
