"""The attention backends' KV tensors as vLLM 0.32 builds them, and the bytes gpukv moves out of them.

- FlashInfer (non-NVFP4): the per-layer tensors come from vLLM's own ``allocate_kv_cache`` in
  each physical order vLLM may pick; K and V are read the way FlashInfer's forward reads them
  (``kv_cache.permute(layer_view_order).split(head_size, -1)``). A chunk gpukv packs holds, per
  layer, exactly those K rows then those V rows, and unpacking it into a cache of another
  physical order gives FlashInfer the same K and V there.
- AMX_MLA (vLLM-CPU on CPUs with AMX, bf16): vLLM's own ``amx_mla_concat_and_cache`` op writes
  the latent rows; gpukv's view finds ``[kv_c | k_pe]`` as each token's row.
"""

from __future__ import annotations

import pytest
import torch

from vllm_runs import require_vllm

require_vllm()

from vllm.v1.kv_cache_interface import (FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec,  # noqa: E402
                                        KVCacheTensor, compute_layout_strides)
from vllm.v1.kv_cache_layout import KVCacheLayout  # noqa: E402
from vllm.v1.worker.utils import allocate_kv_cache  # noqa: E402

from gpukv.integrations.vllm.layouts import kv_views  # noqa: E402
from gpukv.paged.copy import pack, unpack  # noqa: E402
from gpukv.paged.layout import PagedKV  # noqa: E402

NB, BS, H, HS, LAYERS, CS = 6, 16, 2, 8, 3, 32
NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
SLOTS = [b * BS + o for b in (4, 1) for o in range(BS)]  # one chunk: blocks 4 then 1


def _vllm_caches(layout: KVCacheLayout) -> dict[str, torch.Tensor]:
    """vLLM's KV caches for one group of LAYERS full-attention layers in ``layout``, built as
    ``get_kv_cache_configs`` and the model runner's ``allocate_kv_cache`` build them."""
    spec = FullAttentionSpec(block_size=BS, num_kv_heads=H, head_size=HS, dtype=torch.bfloat16)
    block_stride = spec.page_size_bytes * LAYERS if layout.is_block_outermost else None
    layer_stride, block_stride, *_ = compute_layout_strides(spec, NB, LAYERS, layout,
                                                            fixed_strides=(None, block_stride, None, None, None))
    tensor = KVCacheTensor(size=spec.page_size_bytes * NB * LAYERS, layers=list(NAMES),
                           layer_stride=layer_stride, block_stride=block_stride)
    config = KVCacheConfig(num_blocks=NB, kv_cache_tensors=[tensor],
                           kv_cache_groups=[KVCacheGroupSpec(list(NAMES), spec)])
    return allocate_kv_cache(config, torch.device("cpu"), layout)


def _flashinfer_kv(cache: torch.Tensor, layout: KVCacheLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V as FlashInfer's forward splits them, as ``[B, H, N, HS]`` whatever the order."""
    permuted = cache.permute(*layout.layer_view_order)
    k, v = permuted.split(HS, dim=-1)
    back = [layout.layer_view_order.index(i) for i in range(4)]
    return k.permute(*back), v.permute(*back)


LAYOUTS = [KVCacheLayout.LBHNC, KVCacheLayout.BLHNC, KVCacheLayout.LBNHC]


@pytest.mark.parametrize("src_layout", LAYOUTS, ids=lambda x: x.name)
def test_flashinfer_chunks_hold_the_k_and_v_flashinfer_reads_in_any_physical_order(src_layout):
    src = _vllm_caches(src_layout)
    assert all(t.shape == (NB, H, BS, 2 * HS) for t in src.values())
    gen = torch.Generator().manual_seed(5)
    for cache in src.values():
        cache.view(torch.int16).copy_(torch.randint(-2**15, 2**15, cache.shape, generator=gen,
                                                    dtype=torch.int32).to(torch.int16))
    views, dims, kind = kv_views(src, "FLASHINFER")
    assert (dims, kind) == ("NB,H,BS,2D", "mha") and all(views[n] is src[n] for n in NAMES)
    paged = PagedKV.from_tensors(views, dims, kind=kind)
    slots = torch.tensor(SLOTS, dtype=torch.int64)
    arena = torch.zeros(paged.chunk_bytes(CS) + 64, dtype=torch.uint8)
    pack(paged, slots, arena, torch.tensor([64]), chunk_size=CS)
    chunk = arena[64:].view(torch.bfloat16).view(LAYERS, 2, CS, H * HS)  # [layers, K|V, token, row]
    for layer, name in enumerate(NAMES):
        k, v = _flashinfer_kv(src[name], src_layout)
        for t, slot in enumerate(SLOTS):
            block, offset = divmod(slot, BS)
            assert torch.equal(chunk[layer, 0, t].view(torch.int16), k[block, :, offset].reshape(-1).view(torch.int16))
            assert torch.equal(chunk[layer, 1, t].view(torch.int16), v[block, :, offset].reshape(-1).view(torch.int16))
    for dst_layout in LAYOUTS:  # into a fresh cache of each order, other blocks
        dst = _vllm_caches(dst_layout)
        dst_paged = PagedKV.from_tensors(kv_views(dst, "FLASHINFER")[0], dims, kind=kind)
        dst_slots = [b * BS + o for b in (2, 5) for o in range(BS)]
        unpack(dst_paged, torch.tensor(dst_slots), arena, torch.tensor([64]), chunk_size=CS)
        for name in NAMES:
            (k0, v0), (k1, v1) = _flashinfer_kv(src[name], src_layout), _flashinfer_kv(dst[name], dst_layout)
            for s, d in zip(SLOTS, dst_slots):
                (sb, so), (db, do) = divmod(s, BS), divmod(d, BS)
                assert torch.equal(k1[db, :, do].view(torch.int16), k0[sb, :, so].view(torch.int16))
                assert torch.equal(v1[db, :, do].view(torch.int16), v0[sb, :, so].view(torch.int16))
            untouched = [b for b in range(NB) if b not in (2, 5)]
            assert not dst[name][untouched].view(torch.int16).any()


def test_amx_mla_writes_one_latent_row_per_slot_which_gpukv_moves_whole():
    if not torch.cpu._is_amx_tile_supported():
        pytest.skip("this CPU has no AMX: vLLM-CPU never picks AMX_MLA here")
    from vllm import _custom_ops as ops

    if not hasattr(torch.ops._C, "concat_and_cache_mla_cpu"):  # what ops.amx_mla_concat_and_cache runs
        pytest.skip("this vLLM-CPU build has no AMX MLA kernels")
    block = 32  # AMX_MLA needs a multiple of 32
    caches = {n: torch.zeros(NB, 1, block, 576, dtype=torch.bfloat16) for n in NAMES}
    gen = torch.Generator().manual_seed(9)
    slots = torch.tensor([b * block + o for b in (3, 0) for o in range(block)], dtype=torch.int64)
    written = {}
    for name, cache in caches.items():
        kv_c = torch.randn(len(slots), 512, generator=gen).to(torch.bfloat16)
        k_pe = torch.randn(len(slots), 1, 64, generator=gen).to(torch.bfloat16)
        # the MLA layer binds kv_cache.squeeze(1) (mla_attention.py) and writes through it
        ops.amx_mla_concat_and_cache(kv_c, k_pe.squeeze(1), cache.squeeze(1), slots)
        written[name] = torch.cat([kv_c, k_pe.squeeze(1)], dim=-1)
    views, dims, kind = kv_views(caches, "AMX_MLA")
    assert (dims, kind) == ("NB,BS,D", "mla")
    for name in NAMES:  # the standard MLA layout: row `slot` is the token's [kv_c | k_pe]
        assert torch.equal(views[name].reshape(-1, 576)[slots].view(torch.int16),
                           written[name].view(torch.int16))
    paged = PagedKV.from_tensors(views, dims, kind=kind)
    arena = torch.zeros(2 * paged.chunk_bytes(block), dtype=torch.uint8)
    pack(paged, slots, arena, torch.tensor([0, paged.chunk_bytes(block)]), chunk_size=block)
    dst = {n: torch.zeros(NB, 1, block, 576, dtype=torch.bfloat16) for n in NAMES}
    dst_slots = torch.tensor([b * block + o for b in (1, 5) for o in range(block)], dtype=torch.int64)
    unpack(PagedKV.from_tensors(kv_views(dst, "AMX_MLA")[0], dims, kind=kind), dst_slots, arena,
           torch.tensor([0, paged.chunk_bytes(block)]), chunk_size=block)
    for name in NAMES:
        assert torch.equal(dst[name].reshape(-1, 576)[dst_slots].view(torch.int16),
                           written[name].view(torch.int16))
