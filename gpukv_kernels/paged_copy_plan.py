"""The launch plan of ``paged_copy``: the one function that picks its specialization and grid.

Pure Python (no triton, no torch): the launcher calls :func:`plan_copy` on every call, and the
CPU test that compiles the kernel for sm_90a / sm_100a (tests/test_kernels_sass.py) gets its
variants from the same function, so it compiles what really launches.

How a call is cut into work (the kernel's docstring has the per-thread view):

* **unit**: the access one thread makes at a time: a 16-byte vector (two int64 words) where
  ``word_bytes`` is 16, i.e. every address, size, stride and offset is 16-byte aligned (vLLM's
  allocations are; MLA's 1152 B and fp8_ds_mla's 656 B = 41 x 16 B rows too); otherwise one
  ``word_bytes`` word (the fallback: correct, narrower accesses).
* **segment**: one plane (layer, K/V) of one chunk: ``chunk_size * row_units`` units, contiguous
  in the arena. **item**: ``step`` consecutive units of a segment; the last item of a segment
  is partly masked. Items are the grid-stride loop's jobs: one launch covers every chunk and
  every plane of the layer range.
* **grid**: ``sm_budget`` CTAs of ``NUM_WARPS`` warps (1024 threads), i.e. at most that many SMs
  busy, so a copy on a side stream leaves the rest of the GPU to the model (vLLM's
  ``copy_ops_kernel`` caps its grid the same way). ``None`` = every SM.

Constants and why:

* ``NUM_WARPS = 32``: one CTA fills the threads a budgeted SM may give; a 1024-thread CTA
  also needs <= 64 registers per thread to launch at all (64 Ki registers per SM), which is the
  register bound the SASS test holds the kernel to.
* ``UNITS_PER_THREAD = 4``: a thread issues 4 independent 16-byte loads before its 4 stores,
  64 KiB in flight per SM. Little's law (bytes in flight = bandwidth x latency) at about a
  microsecond of loaded HBM latency asks a few MiB of the whole GPU for its peak: every SM's
  64 KiB is more than that (an estimate; perf/sweep_gpu_copy.py measures it).
* ``DEFAULT_SM_BUDGET = 8``: 8 of an H100/H200's 132 SMs (6 %), of a B200's 148 (5 %): a
  compute-bound kernel beside the copy loses about that share, inside the <= 10 % goal with
  room for memory contention. By the same law 8 x 64 KiB in flight moves on the order of half
  a TB/s, an order of magnitude above what PCIe feeds the arena. A caller with nothing to
  overlap (a copy on the model's own stream) passes ``None``: every SM.
"""

from __future__ import annotations

from dataclasses import dataclass

NUM_WARPS = 32
UNITS_PER_THREAD = 4
VECTOR_BYTES = 16
DEFAULT_SM_BUDGET = 8
WORD_SIZES = (16, 8, 4, 2, 1)
# slot -> (block, position): log2(block_size) >= 0 shifts and masks; otherwise a division in
# 32 bits where every slot fits (inline, a few instructions), else in 64 bits (a routine call)
DIV32, DIV64 = -1, -2
INT32_MAX = 2**31 - 1


@dataclass(frozen=True, slots=True)
class CopyPlan:
    """What one ``paged_copy`` call launches. Sizes and strides in units of ``unit_bytes``."""

    word_bytes: int  # the integer word the kernel moves: 8, 4, 2 or 1 bytes
    vec: int  # words per access: 2 (16-byte vectors) or 1
    row_units: int
    head_units: int  # == row_units where heads are contiguous (NHD, MLA, one head)
    step: int  # units per item (NUM_WARPS * 32 * UNITS_PER_THREAD)
    slot_div: int  # log2(block_size), or DIV32 / DIV64
    num_warps: int
    items_per_segment: int
    num_items: int
    num_planes: int
    plane_start: int
    grid: int
    stride_block: int
    stride_token: int
    stride_head: int

    @property
    def unit_bytes(self) -> int:
        return self.word_bytes * self.vec

    def constexprs(self, pack: bool) -> dict:
        """The kernel's constexpr arguments (``WORD`` as a size in bytes; the launcher maps it
        to a Triton type)."""
        return dict(WORD=self.word_bytes, VEC=self.vec, ROW_UNITS=self.row_units,
                    HEAD_UNITS=self.head_units, STEP=self.step, SLOT_DIV=self.slot_div,
                    PACK=bool(pack))


def plan_copy(*, num_tokens: int, num_blocks: int, block_size: int, chunk_size: int, num_kv: int,
              num_heads: int, head_bytes: int, stride_block: int, stride_token: int,
              stride_head: int, layer_start: int, layer_stop: int, word_bytes: int,
              sm_budget: int | None, sm_count: int | None) -> CopyPlan:
    """The plan of a call whose arguments passed the launcher's checks. ``sm_count``: SMs of the
    arena's device (None off a GPU: the grid is then only bounded by the budget and the work)."""
    unit = word_bytes if word_bytes < VECTOR_BYTES else VECTOR_BYTES
    word = min(word_bytes, 8)
    row_bytes = num_heads * head_bytes
    contiguous_heads = num_heads == 1 or stride_head == head_bytes
    row_units = row_bytes // unit
    head_units = row_units if contiguous_heads else head_bytes // unit
    step = NUM_WARPS * 32 * UNITS_PER_THREAD
    items_per_segment = -(-chunk_size * row_units // step)
    num_planes = (layer_stop - layer_start) * num_kv
    num_items = (num_tokens // chunk_size) * num_planes * items_per_segment
    ctas = sm_count if sm_budget is None else sm_budget
    if sm_count is not None:
        ctas = min(ctas, sm_count)
    grid = max(1, min(num_items, ctas if ctas is not None else num_items))
    if block_size & (block_size - 1) == 0:
        slot_div = block_size.bit_length() - 1
    else:
        slot_div = DIV32 if num_blocks * block_size <= INT32_MAX else DIV64
    return CopyPlan(word_bytes=word, vec=unit // word, row_units=row_units, head_units=head_units,
                    step=step, slot_div=slot_div, num_warps=NUM_WARPS,
                    items_per_segment=items_per_segment, num_items=num_items,
                    num_planes=num_planes, plane_start=layer_start * num_kv, grid=grid,
                    stride_block=stride_block // unit, stride_token=stride_token // unit,
                    stride_head=stride_head // unit)


def check_budget(sm_budget) -> None:
    """``sm_budget`` is None (every SM) or a positive int."""
    if sm_budget is not None and (not isinstance(sm_budget, int) or isinstance(sm_budget, bool)
                                  or sm_budget <= 0):
        raise ValueError(f"sm_budget must be a positive int (SMs' worth of CTAs) or None (every "
                         f"SM), got {sm_budget!r}")
