"""The transformers adapter: what a real model's cache holds, and model cache <-> pages, bit-exact.

Tiny random-weight models built from configs (no download): a GQA Llama (3 layers, 2 KV heads of
32) and a DeepSeek-V3 with MLA (3 layers, latent row 32 + 16 = 48), fp32 on CPU.
"""

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers", minversion="5.0")

from gpukv.integrations.transformers import (  # noqa: E402
    _cache_argument,
    alloc_pages,
    cache_tokens,
    cache_to_pages,
    forward,
    kv_layout,
    kv_spec,
    pages_to_cache,
    tiny_deepseek,
    tiny_llama,
)

BS = 16
NUM_BLOCKS = 16
BUILDERS = {"llama": tiny_llama, "deepseek": tiny_deepseek}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def model(request):
    return BUILDERS[request.param]()


def _tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed))


def _slots(block_ids: list[int], num_tokens: int) -> torch.Tensor:
    offs = torch.arange(num_tokens)
    return torch.as_tensor(block_ids)[offs // BS] * BS + offs % BS


def test_layouts_and_page_shapes():
    llama, deepseek = tiny_llama(), tiny_deepseek()
    assert kv_layout(llama) == ("NB,2,BS,H,D", "mha")
    assert kv_layout(deepseek) == ("NB,BS,D", "mla")
    pages = alloc_pages(llama, 5, BS)
    assert len(pages) == 3 and all(p.shape == (5, 2, BS, 2, 32) and p.dtype == torch.float32 for p in pages)
    pages = alloc_pages(deepseek, 5, BS)
    assert len(pages) == 3 and all(p.shape == (5, BS, 32 + 16) for p in pages)
    spec = kv_spec(deepseek)
    assert (spec.latent_dim, spec.rope_dim, spec.head_dim, spec.num_heads) == (32, 16, 48, 1)


def test_tiny_models_depend_only_on_the_seed():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b, c = tiny_llama(seed=1), tiny_llama(seed=1), tiny_llama(seed=2)
    assert torch.equal(torch.random.get_rng_state(), before)  # caller's RNG untouched
    wa, wb, wc = (m.model.layers[0].self_attn.k_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_deepseek_cache_holds_the_mla_latent_not_expanded_kv():
    """keys = kv_a_layernorm(compressed KV) [1,1,T,32]; values = RoPE'd k_rot [1,1,T,16]."""
    model = tiny_deepseek()
    attn = model.model.layers[0].self_attn
    seen = {}
    attn.register_forward_pre_hook(lambda mod, args, kwargs: seen.update(h=kwargs["hidden_states"]),
                                   with_kwargs=True)
    _, cache = forward(model, _tokens(40, 0))
    keys, values = cache.layers[0].keys, cache.layers[0].values
    assert keys.shape == (1, 1, 40, 32) and values.shape == (1, 1, 40, 16)
    with torch.no_grad():
        compressed = attn.kv_a_proj_with_mqa(seen["h"])[0]  # [T, 32 + 16]
        latent = attn.kv_a_layernorm(compressed[:, :32])
    assert torch.equal(keys[0, 0], latent)
    raw_rope = compressed[:, 32:]
    # position 0 rotates by angle 0: only the de-interleave (even lanes, then odd lanes) remains
    assert torch.equal(values[0, 0, 0], torch.cat([raw_rope[0, 0::2], raw_rope[0, 1::2]]))
    assert not torch.equal(values[0, 0, 1], torch.cat([raw_rope[1, 0::2], raw_rope[1, 1::2]]))


def test_llama_cache_holds_gqa_heads():
    _, cache = forward(tiny_llama(), _tokens(40, 0))
    assert len(cache.layers) == 3
    assert cache.layers[0].keys.shape == cache.layers[0].values.shape == (1, 2, 40, 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_round_trip_through_scattered_pages_is_bit_exact(name, dtype):
    model = BUILDERS[name](dtype=dtype)
    spec = kv_spec(model)
    _, cache = forward(model, _tokens(70, 1))
    pages = alloc_pages(model, NUM_BLOCKS, BS, fill=float("nan"))
    blocks = [9, 2, 14, 5, 0]  # scattered, out of order; the last block is partly used
    slots = _slots(blocks, 70)
    slots[[50, 66]] = -1  # padding: skipped
    cache_to_pages(model, cache, pages, slots, 70)
    for page, (keys, values) in zip(pages, cache_tokens(model, cache, 70)):
        t = 41  # block 2 (blocks[2] = 14), offset 9
        if spec.kind == "mla":
            assert torch.equal(page[14, 9], torch.cat([keys[0, 0, t], values[0, 0, t]]))
        else:
            assert torch.equal(page[14, 0, 9], keys[0, :, t]) and torch.equal(page[14, 1, 9], values[0, :, t])
        written = torch.zeros(NUM_BLOCKS * BS, dtype=torch.bool)
        written[slots[slots >= 0]] = True
        flat = page.reshape(NUM_BLOCKS, -1, BS, *page.shape[-2 if spec.kind == "mha" else 2:])
        flat = flat.transpose(1, 2).reshape(NUM_BLOCKS * BS, -1)
        assert not flat[written].isnan().any()
        assert flat[~written].isnan().all()  # untouched slots (incl. the padded tokens') still poisoned
    rebuilt = pages_to_cache(model, pages, _slots(blocks, 64)[:32], 32)
    assert rebuilt.get_seq_length() == 32
    for (k0, v0), (k1, v1) in zip(cache_tokens(model, cache, 32), cache_tokens(model, rebuilt, 32)):
        assert k1.is_contiguous() and torch.equal(k0, k1) and torch.equal(v0, v1)


def test_logits_on_a_cache_rebuilt_from_request_a_pages_equal_a_full_prefill(model):
    """B = A's first 64 tokens + its own 64; suffix on the rebuilt cache == full prefill of B."""
    prompt_a, prefix = _tokens(96, 2), 64
    prompt_b = torch.cat([prompt_a[:prefix], _tokens(64, 3)])
    _, cache_a = forward(model, prompt_a)
    pages = alloc_pages(model, NUM_BLOCKS, BS)
    slots_a = _slots([3, 11, 7, 1, 8, 12], 96)
    cache_to_pages(model, cache_a, pages, slots_a, 96)
    full, _ = forward(model, prompt_b)
    cached, grown = forward(model, prompt_b[prefix:], pages_to_cache(model, pages, slots_a[:prefix], prefix))
    assert grown.get_seq_length() == 128
    assert torch.equal(cached, full)
    unrelated, _ = forward(model, prompt_b[prefix:])  # no cache: a different answer
    assert not torch.equal(unrelated, full)


def test_errors_name_the_bad_value():
    model = tiny_llama()
    _, cache = forward(model, _tokens(32, 0))
    pages = alloc_pages(model, 4, BS)
    slots = torch.arange(32)
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        kv_layout(SimpleNamespace(config=SimpleNamespace(model_type="gpt2")))
    with pytest.raises(ValueError, match="num_blocks"):
        alloc_pages(model, 0, BS)
    with pytest.raises(ValueError, match=r"alloc returned \(4, 2, 16, 2, 32\) torch.float16"):
        alloc_pages(model, 4, BS, alloc=lambda shape, dtype: torch.empty(shape, dtype=torch.float16))
    with pytest.raises(ValueError, match="pages has 2 layers"):
        cache_to_pages(model, cache, pages[:2], slots, 32)
    with pytest.raises(ValueError, match=r"pages\[1\] is \(4, 2, 16, 2, 32\) torch.float16"):
        cache_to_pages(model, cache, [pages[0], pages[1].half(), pages[2]], slots, 32)
    with pytest.raises(ValueError, match="expected 5 dims"):
        cache_to_pages(model, cache, [p[0] for p in pages], slots, 32)
    with pytest.raises(ValueError, match="out-of-range slots \\[64\\]"):
        cache_to_pages(model, cache, pages, torch.arange(32) + 33, 32)
    with pytest.raises(ValueError, match="num_tokens=31"):
        cache_to_pages(model, cache, pages, slots, 31)
    with pytest.raises(TypeError, match="int32/int64"):
        cache_to_pages(model, cache, pages, slots.float(), 32)
    with pytest.raises(ValueError, match=">= 40 tokens"):
        cache_to_pages(model, cache, alloc_pages(model, 4, BS), torch.arange(40), 40)
    with pytest.raises(ValueError, match="out-of-range slots \\[-1\\]"):
        pages_to_cache(model, pages, torch.tensor([0, -1]), 2)  # a cache cannot have holes
    with pytest.raises(ValueError, match="num_tokens must be a positive int"):
        pages_to_cache(model, pages, torch.arange(0), 0)
    with pytest.raises(ValueError, match="token_ids"):
        forward(model, torch.arange(0))


def test_the_cache_argument_is_found_by_name_on_either_transformers_version():
    """5.19 takes ``past_key_values``, 5.24 ``cache``, and returns the cache in the output field of
    the same name; a model with neither is refused by name."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    fields = CausalLMOutputWithPast.__dataclass_fields__
    expected = "cache" if "cache" in fields else "past_key_values"
    assert expected in fields
    assert _cache_argument(type(tiny_llama())) == _cache_argument(type(tiny_deepseek())) == expected

    class NoCache:
        def forward(self, input_ids, kv=None):
            return None

    with pytest.raises(TypeError, match=r"NoCache.forward takes neither .*\['self', 'input_ids', 'kv'\]"):
        _cache_argument(NoCache)
