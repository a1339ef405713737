"""The launch plan of the copy kernel (gpukv_kernels/paged_copy_plan.py): plain Python, exact values.

What a wrong plan would do on a GPU: use more SMs than the budget, pick 16-byte vectors for a
layout that is only 8-byte aligned (a misaligned-address fault), cut heads that are not
contiguous as if they were (wrong bytes), or divide by a block size that is not a power of two
with a shift. The compiled code of these plans is checked in test_kernels_sass.py; their bytes in
test_kernels_triton.py.
"""

import pytest

from gpukv_kernels.paged_copy_plan import (DEFAULT_SM_BUDGET, DIV32, DIV64, NUM_WARPS,
                                           UNITS_PER_THREAD, check_budget, plan_copy)

STEP = NUM_WARPS * 32 * UNITS_PER_THREAD


def _plan(**change):
    """One chunk of 256 tokens of Llama-8B K/V in HND (8 heads of 256 B), 32 layers."""
    args = dict(num_tokens=256, num_blocks=1000, block_size=16, chunk_size=256, num_kv=2,
                num_heads=8, head_bytes=256, stride_block=2 * 8 * 16 * 256, stride_token=256,
                stride_head=16 * 256, layer_start=0, layer_stop=32, word_bytes=16,
                sm_budget=DEFAULT_SM_BUDGET, sm_count=132)
    return plan_copy(**{**args, **change})


def test_vector_plan_of_llama_hnd():
    plan = _plan()
    assert (plan.word_bytes, plan.vec, plan.unit_bytes) == (8, 2, 16)
    assert (plan.row_units, plan.head_units) == (128, 16)  # 2048 B rows of 256 B heads
    assert (plan.stride_block, plan.stride_token, plan.stride_head) == (4096, 16, 256)
    assert plan.items_per_segment == 256 * 128 // STEP == 8
    assert plan.num_items == 64 * 8 and plan.num_planes == 64 and plan.plane_start == 0
    assert plan.grid == DEFAULT_SM_BUDGET == 8 and plan.num_warps == 32
    assert plan.slot_div == 4


def test_contiguous_heads_are_one_row():
    nhd = _plan(stride_head=256, stride_token=2048)
    assert nhd.head_units == nhd.row_units == 128
    one_head = _plan(num_heads=1, stride_head=0)  # a size-1 dim has stride 0
    assert one_head.head_units == one_head.row_units == 16


@pytest.mark.parametrize("word_bytes, unit, vec", [(16, 16, 2), (8, 8, 1), (4, 4, 1), (2, 2, 1), (1, 1, 1)])
def test_unit_is_a_vector_only_at_16_byte_alignment(word_bytes, unit, vec):
    plan = _plan(word_bytes=word_bytes)
    assert (plan.unit_bytes, plan.vec) == (unit, vec)
    assert plan.row_units == 2048 // unit and plan.stride_head == 16 * 256 // unit


@pytest.mark.parametrize("budget, sm_count, grid", [
    (8, 132, 8), (16, 132, 16), (None, 132, 132), (500, 132, 132),  # never more CTAs than SMs
    (1, 132, 1), (3, None, 3), (None, None, 512),  # off a GPU: the budget, else one per item
])
def test_grid_is_the_sm_budget(budget, sm_count, grid):
    assert _plan(sm_budget=budget, sm_count=sm_count).grid == grid


def test_grid_never_exceeds_the_items():
    plan = _plan(layer_start=3, layer_stop=4, chunk_size=16, num_tokens=16, sm_budget=None)
    assert (plan.num_items, plan.grid, plan.plane_start, plan.num_planes) == (2, 2, 6, 2)


def test_mla_rows_of_41_vectors_leave_a_partial_last_item():
    # fp8_ds_mla: 656-byte records = 41 units; 256 tokens = 10496 units = 2 full items + 1 partial
    plan = _plan(num_kv=1, num_heads=1, head_bytes=656, stride_block=64 * 656, stride_token=656,
                 stride_head=0, block_size=64, layer_stop=61)
    assert (plan.row_units, plan.items_per_segment, plan.num_items) == (41, 3, 61 * 3)
    assert plan.slot_div == 6


@pytest.mark.parametrize("block_size, num_blocks, slot_div", [
    (1, 10, 0), (64, 10, 6), (128, 10, 7), (48, 10, DIV32), (48, 2**31 // 48 + 1, DIV64),
    (48, (2**31 - 1) // 48, DIV32)])
def test_slot_division(block_size, num_blocks, slot_div):
    assert _plan(block_size=block_size, num_blocks=num_blocks).slot_div == slot_div


@pytest.mark.parametrize("budget", [0, -1, True, 2.5, "8"])
def test_bad_budgets_are_refused_naming_the_value(budget):
    with pytest.raises(ValueError, match=f"sm_budget must be a positive int .* got {budget!r}"):
        check_budget(budget)
    check_budget(None)
    check_budget(1)
