"""PagedKV.from_tensors: every dims string, stride orders, and the errors for what does not fit."""

import pytest
import torch

from gpukv.paged.copy_triton import address_table
from gpukv.paged.layout import PagedKV
from gpukv.paged.units import unit_views
from paged_cases import LAYOUTS, make_cache


@pytest.mark.parametrize("layout", LAYOUTS)
def test_describes_every_layout(layout):
    layers, dims, kind = make_cache(layout, num_layers=3, num_blocks=6, block_size=16, heads=2, head_dim=8)
    paged = PagedKV.from_tensors(layers, dims, kind=kind)
    mla = kind == "mla"
    sglang = dims == "S,H,D"
    assert paged.num_layers == 3 and paged.num_kv == (1 if mla else 2)
    assert paged.block_size == (1 if sglang else 16)
    assert paged.num_slots == 96
    assert paged.row_bytes == 2 * 8 * 2  # heads * head_dim * bf16 (MLA: one 16-wide row)
    assert paged.chunk_shape(32) == (3, paged.num_kv, 32, 32)
    assert paged.chunk_bytes(32) == 3 * paged.num_kv * 32 * 32
    assert len(paged.base_ptrs) == 3 and all(len(row) == paged.num_kv for row in paged.base_ptrs)


def test_kv_offsets_and_strides_match_the_tensors():
    layers, dims, kind = make_cache("kv_first", num_blocks=4, block_size=16, heads=2, head_dim=8)
    paged = PagedKV.from_tensors(layers, dims, kind=kind)
    t = layers[1]
    assert paged.base_ptrs[1] == (t[0].data_ptr(), t[1].data_ptr())
    assert (paged.stride_block_bytes, paged.stride_token_bytes, paged.stride_head_bytes) == (
        t.stride(1) * 2, t.stride(2) * 2, t.stride(3) * 2)
    packed, dims, kind = make_cache("packed", head_dim=8)
    p = PagedKV.from_tensors(packed, dims, kind=kind)
    assert p.base_ptrs[0][1] - p.base_ptrs[0][0] == 8 * 2  # V is the second half of each head


def test_hnd_strides_come_from_the_tensor():
    layers, dims, kind = make_cache("flashinfer_hnd", num_blocks=4, block_size=16, heads=2, head_dim=8)
    paged = PagedKV.from_tensors(layers, dims, kind=kind)
    assert paged.stride_token_bytes == 8 * 2 and paged.stride_head_bytes == 16 * 8 * 2


def test_stacked_tensor_with_layer_first():
    stacked = torch.zeros(5, 4, 16, 576, dtype=torch.bfloat16)
    paged = PagedKV.from_tensors(stacked, "NB,BS,D", kind="mla")
    assert paged.num_layers == 5 and paged.row_bytes == 1152
    assert paged.base_ptrs[3][0] == stacked[3].data_ptr()


def test_fp8_ds_mla_records():
    layers = [torch.zeros(4, 64, 656, dtype=torch.uint8) for _ in range(2)]
    paged = PagedKV.from_tensors(layers, "NB,BS,D", kind="mla")
    assert paged.row_bytes == 656 and paged.chunk_bytes(256) == 2 * 256 * 656


@pytest.mark.parametrize("dtype, width, word", [
    (torch.bfloat16, 576, 8), (torch.uint8, 656, 8), (torch.float8_e4m3fn, 580, 4),
    (torch.float16, 3, 2), (torch.uint8, 13, 1)])
def test_word_is_the_widest_that_divides_heads_strides_and_addresses(dtype, width, word):
    paged = PagedKV.from_tensors([torch.zeros(3, 16, width, dtype=dtype) for _ in range(2)],
                                 "NB,BS,D", kind="mla")
    assert paged.word_bytes == word
    assert address_table(paged).tolist() == [row[0] for row in paged.base_ptrs]
    plane = unit_views(paged).planes[0]
    assert plane.dtype.itemsize == word and plane.shape == (48, width * dtype.itemsize // word)


def test_fingerprint_is_layout_not_memory():
    a = PagedKV.from_tensors([torch.zeros(4, 16, 64, dtype=torch.bfloat16)], "NB,BS,D", kind="mla")
    b = PagedKV.from_tensors([torch.ones(9, 16, 64, dtype=torch.bfloat16)], "NB,BS,D", kind="mla")
    c = PagedKV.from_tensors([torch.zeros(4, 16, 64, dtype=torch.float16)], "NB,BS,D", kind="mla")
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


@pytest.mark.parametrize("layers, dims, kind, message", [
    ([torch.zeros(4, 16, 64)], "NB,BS,D", "gqa", "kind must be 'mha' or 'mla'"),
    ([torch.zeros(4, 16, 64)], "NB,XX,D", "mla", "unknown dims 'NB,XX,D'"),
    ([torch.zeros(4, 16, 64)], "NB,BS,D", "mha", "is a mla layout, but kind='mha'"),
    ([torch.zeros(4, 16, 64)], "2,NB,BS,H,D", "mha", "expected 5 dims"),
    ([torch.zeros(3, 4, 16, 2, 8)], "2,NB,BS,H,D", "mha", "dim '2' of '2,NB,BS,H,D' has size 3"),
    ([torch.zeros(4, 16, 64), torch.zeros(4, 16, 32)], "NB,BS,D", "mla", "layer 1 is (4, 16, 32)"),
    ([torch.zeros(4, 16, 64), torch.zeros(4, 16, 64, dtype=torch.float16)], "NB,BS,D", "mla", "layer 1 is"),
    ([torch.zeros(4, 16, 64), torch.zeros(4, 16, 64, device="meta")], "NB,BS,D", "mla", "on meta; layer 0"),
    ([torch.zeros(4, 64, 16).transpose(1, 2)], "NB,BS,D", "mla", "must be contiguous (stride 1)"),
    ([torch.zeros(4, 2, 16, 7)], "NB,H,BS,2D", "mha", "odd size 7"),
    ([torch.zeros(64, 2, 8)], "S,H,D", "mla", "one latent row per token, got H=2"),
    ([torch.zeros(64, 2, 8)], "S,H,D", "mha", "take layers=(k_layers, v_layers)"),
    (([torch.zeros(64, 2, 8)], []), "S,H,D", "mha", "v_layers is empty"),
    (([torch.zeros(64, 2, 8)] * 2, [torch.zeros(64, 2, 8)]), "S,H,D", "mha", "equal in length, got 2 and 1"),
    ([], "NB,BS,D", "mla", "layers is empty"),
    (torch.zeros(4, 16, 64), "NB,BS,D", "mla", "a stacked cache needs 4 dims"),
    (["not a tensor"], "NB,BS,D", "mla", "layer 0 is a str"),
    ([torch.zeros(0, 16, 64)], "NB,BS,D", "mla", "dim 'NB' of 'NB,BS,D' has size 0 (no blocks)"),
    ([torch.zeros(0, 2, 8)], "S,H,D", "mla", "dim 'S' of 'S,H,D' has size 0 (no slots)"),
    (([torch.zeros(0, 2, 8)], [torch.zeros(0, 2, 8)]), "S,H,D", "mha", "dim 'S' of 'S,H,D' has size 0"),
    ([torch.zeros(2, 0, 16, 2, 8)], "2,NB,BS,H,D", "mha", "dim 'NB' of '2,NB,BS,H,D' has size 0"),
    ([torch.zeros(4, 0, 64)], "NB,BS,D", "mla", "dim 'BS' of 'NB,BS,D' has size 0 (no tokens per block)"),
    ([torch.zeros(4, 0, 2, 16, 8)], "NB,H,2,BS,D", "mha", "dim 'H' of 'NB,H,2,BS,D' has size 0 (no heads)"),
    ([torch.zeros(4, 16, 0)], "NB,BS,D", "mla", "dim 'D' of 'NB,BS,D' has size 0"),
    ([torch.zeros(16, 64).expand(4, 16, 64)], "NB,BS,D", "mla", "dim 'NB' of 'NB,BS,D' has stride 0"),
    ([torch.zeros(4, 16, 64).to_sparse()], "NB,BS,D", "mla", "layer 0 is a torch.sparse_coo tensor"),
    ([torch.zeros(4, 16, 64)], None, "mla", "unknown dims None"),
    ([torch.zeros(4, 16, 64)], "NB,BS,D", None, "kind must be 'mha' or 'mla', got None"),
    (iter([torch.zeros(4, 16, 64)]), "NB,BS,D", "mla", "layers must be a list, tuple or dict"),
    ({}, "NB,BS,D", "mla", "layers is empty"),
])
def test_bad_layouts_name_the_problem(layers, dims, kind, message):
    with pytest.raises(ValueError, match=__import__("re").escape(message)):
        PagedKV.from_tensors(layers, dims, kind=kind)


def test_describe_is_plain_values_that_size_chunks():
    import msgspec

    layers, dims, kind = make_cache("flashinfer_hnd", num_layers=3, num_blocks=5, block_size=16,
                                    heads=2, head_dim=8)
    paged = PagedKV.from_tensors(layers, dims, kind=kind)
    desc = paged.describe()
    assert desc == dict(kind="mha", dims="NB,2,BS,H,D", dtype="bfloat16", num_layers=3, num_kv=2,
                        num_heads=2, head_bytes=16, row_bytes=32, block_size=16, num_blocks=5)
    assert all(type(v) in (str, int) for v in desc.values())
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(desc))
    assert back == desc
    # what a server computes from the message alone equals the descriptor's own sizes
    assert back["num_layers"] * back["num_kv"] * 256 * back["row_bytes"] == paged.chunk_bytes(256)


def test_layer_bytes_is_one_layer_of_a_chunk():
    layers, dims, kind = make_cache("kv_first", num_layers=3, heads=2, head_dim=8)
    paged = PagedKV.from_tensors(layers, dims, kind=kind)
    assert paged.layer_bytes(16) == 2 * 16 * 32 and paged.chunk_bytes(16) == 3 * paged.layer_bytes(16)
    mla = PagedKV.from_tensors(torch.zeros(2, 4, 16, 656, dtype=torch.uint8), "NB,BS,D", kind="mla")
    assert mla.layer_bytes(64) == 64 * 656
    for bad in (0, -1, True, 2.0, "16"):
        for method in (paged.layer_bytes, paged.chunk_bytes, paged.chunk_shape):
            with pytest.raises(ValueError, match="chunk_size must be a positive int"):
                method(bad)


def test_derived_tables_are_built_once_per_cache():
    layers, dims, kind = make_cache("packed")
    paged = PagedKV.from_tensors(layers, dims, kind=kind)
    assert address_table(paged) is address_table(paged)
    assert unit_views(paged) is unit_views(paged) and unit_views(paged, 2) is not unit_views(paged)
    other = PagedKV.from_tensors(layers, dims, kind=kind)
    assert other == paged and address_table(other) is not address_table(paged)
    assert address_table(other).tolist() == address_table(paged).tolist()


def test_kernels_package_does_not_import_the_control_plane():
    import subprocess
    import sys

    code = ("import sys, gpukv_kernels.paged_copy; "
            "print(sorted(m for m in sys.modules if m == 'gpukv' or m.startswith('gpukv.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "TRITON_INTERPRET": "1"})
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("form", ["list", "tuple", "dict", "stacked"])
def test_layers_as_list_tuple_dict_or_stacked(form):
    buf = torch.zeros(4, 6, 16, 576, dtype=torch.bfloat16)  # 4 MLA layers, views of one buffer
    order = [2, 0, 3, 1]
    given = {"list": [buf[i] for i in order], "tuple": tuple(buf[i] for i in order),
             "dict": {f"model.layers.{i}.attn": buf[i] for i in order}, "stacked": buf[order]}[form]
    paged = PagedKV.from_tensors(given, "NB,BS,D", kind="mla")
    assert paged.num_layers == 4 and paged.num_blocks == 6
    if form != "stacked":  # layer order is the given order (a dict's insertion order)
        assert [row[0] for row in paged.base_ptrs] == [buf[i].data_ptr() for i in order]


def test_sglang_pools_accept_dicts_for_k_and_v():
    k = {f"k{i}": torch.zeros(32, 2, 8) for i in range(3)}
    v = {f"v{i}": torch.zeros(32, 2, 8) for i in range(3)}
    paged = PagedKV.from_tensors((k, v), "S,H,D", kind="mha")
    assert [row[1] for row in paged.base_ptrs] == [t.data_ptr() for t in v.values()]


def test_vllm_cpu_split_layout_strides():
    """vLLM CPU (0.32): [NB, H, BS, 2D] whose head block is all K rows, then all V rows."""
    nb, h, bs, d = 5, 2, 16, 8
    t = torch.zeros(nb, h, bs, 2 * d, dtype=torch.bfloat16)
    paged = PagedKV.from_tensors([t.view(nb, h, 2, bs, d)], "NB,H,2,BS,D", kind="mha")
    assert (paged.stride_block_bytes, paged.stride_head_bytes, paged.stride_token_bytes) == (
        h * 2 * bs * d * 2, 2 * bs * d * 2, d * 2)
    assert paged.base_ptrs[0] == (t.data_ptr(), t.data_ptr() + bs * d * 2)  # V: half a head block on
    assert (paged.num_heads, paged.head_bytes, paged.row_bytes, paged.block_size) == (h, 16, 32, bs)
    assert "dims=NB,H,2,BS,D" in paged.fingerprint()
    packed = PagedKV.from_tensors([t], "NB,H,BS,2D", kind="mha")  # same shape, other meaning
    assert packed.fingerprint() != paged.fingerprint() and packed.describe()["row_bytes"] == 32


def test_vllm_cpu_mla_squeezed_view():
    t = torch.zeros(7, 1, 16, 576, dtype=torch.bfloat16)
    paged = PagedKV.from_tensors([t.squeeze(1)] * 2, "NB,BS,D", kind="mla")
    assert (paged.num_blocks, paged.block_size, paged.row_bytes) == (7, 16, 1152)
    assert paged.stride_block_bytes == 16 * 1152 and paged.base_ptrs[1] == (t.data_ptr(),)
