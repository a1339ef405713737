"""Prefix reuse on a real model: request A fills gpukv, request B starts from A's cached prefix.

The scenario, as tests, the demo and ``perf/sweep_ttft.py`` run it:

1. Workers: ``tp_size`` simulated TP ranks, each with its own vLLM-shaped paged cache registered
   with the engine (MLA: every rank holds the same latent; MHA: ``tp_size`` must be 1 here).
2. Request A: prefill, copy the model's cache into rank 0's pages, ``store`` its full chunks.
3. Request B (shares A's first chunks, has its own suffix): ``lookup`` with ``tp_size`` (MLA: one
   share per rank), every rank ``retrieve``s the hit prefix into fresh (NaN-poisoned) blocks of its
   own pages, rebuilds a transformers cache from them and runs only the suffix; the next-token
   logits are compared with a full prefill of B, and each rank greedily decodes a few tokens.

``engine`` is anything with the :class:`gpukv.CacheEngine` API (register / unregister / store /
lookup / retrieve / free_lookup_locks / end_session), so a ``CacheClient`` can stand in for it.
"""

from __future__ import annotations

import itertools
import statistics
import tempfile
import time
import uuid
from typing import Any, Callable

import torch

from gpukv.integrations.transformers import (
    alloc_pages,
    cache_to_pages,
    cache_tokens,
    forward,
    kv_spec,
    pages_to_cache,
)
from gpukv.testing.reuse_result import RankResult, ReuseResult


def _slots(block_ids: list[int], num_tokens: int, block_size: int) -> torch.Tensor:
    offs = torch.arange(num_tokens)
    return torch.as_tensor(block_ids, dtype=torch.int64)[offs // block_size] * block_size + offs % block_size


def _as_tokens(token_ids: Any) -> torch.Tensor:
    tokens = torch.as_tensor(token_ids, dtype=torch.int64)
    if tokens.dim() != 1 or tokens.numel() == 0:
        raise ValueError(f"token ids must be a non-empty 1-D sequence, got shape {tuple(tokens.shape)}")
    return tokens


class PrefixReuse:
    """``tp_size`` simulated workers of one model, registered with ``engine`` as
    ``<model_name>-<random>-rank<r>``; pages sized for prompts of up to ``max_tokens`` tokens
    (``alloc(shape, dtype)``: how to allocate them, e.g. in shared memory for a server).

    Rank ``r``'s pages: blocks ``[0, n)`` hold request A (rank 0 only), request B goes into the
    top blocks in reverse order, so retrieved slots never coincide with stored ones.
    """

    def __init__(self, engine: Any, model: torch.nn.Module, *, model_name: str, max_tokens: int,
                 tp_size: int = 1, block_size: int = 16, alloc: Callable | None = None) -> None:
        self.spec = kv_spec(model)
        if not isinstance(tp_size, int) or tp_size < 1:
            raise ValueError(f"tp_size must be a positive int, got {tp_size!r}")
        if self.spec.kind == "mha" and tp_size != 1:
            raise ValueError(f"tp_size={tp_size}: MHA TP ranks hold different shards; this scenario "
                             "simulates MLA TP groups only (use tp_size=1 for MHA)")
        if not isinstance(max_tokens, int) or max_tokens <= 0:
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        self.engine, self.model, self.model_name = engine, model, model_name
        self.tp_size, self.block_size = tp_size, block_size
        self.blocks_per_prompt = -(-max_tokens // block_size)
        self.num_blocks = 2 * self.blocks_per_prompt
        self.pages = [alloc_pages(model, self.num_blocks, block_size, fill=float("nan"), alloc=alloc)
                      for _ in range(tp_size)]
        session = uuid.uuid4().hex[:8]
        self.instance_ids = [f"{model_name}-{session}-rank{r}" for r in range(tp_size)]
        self._requests = itertools.count()
        self._cache_a = None  # request A's own cache, to check rebuilt caches against
        registered = []
        try:
            for rank, (iid, pages) in enumerate(zip(self.instance_ids, self.pages)):
                engine.register(iid, model_name, pages, self.spec.dims, kind=self.spec.kind,
                                tp_rank=rank, tp_size=tp_size)
                registered.append(iid)
        except BaseException:
            for iid in registered:
                engine.unregister(iid)
            raise

    def close(self) -> None:
        """Unregister the workers (what they stored stays cached)."""
        for iid in self.instance_ids:
            self.engine.unregister(iid)
        self.instance_ids = []

    def __enter__(self) -> "PrefixReuse":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_len(self, tokens: torch.Tensor) -> None:
        if tokens.numel() > self.blocks_per_prompt * self.block_size:
            raise ValueError(f"prompt of {tokens.numel()} tokens exceeds max_tokens="
                             f"{self.blocks_per_prompt * self.block_size}")

    def store(self, prompt_a: Any) -> int:
        """Request A: prefill, copy the cache into rank 0's pages, store; returns tokens stored."""
        tokens = _as_tokens(prompt_a)
        self._check_len(tokens)
        _, cache = forward(self.model, tokens)
        slots = _slots(list(range(self.blocks_per_prompt)), tokens.numel(), self.block_size)
        cache_to_pages(self.model, cache, self.pages[0], slots, tokens.numel())
        self._cache_a = cache
        return self.engine.store(self.instance_ids[0], tokens, slots)

    def serve(self, prompt_b: Any, *, decode_tokens: int = 4) -> ReuseResult:
        """Request B through gpukv on every rank, and as a full prefill; see the module doc."""
        tokens = _as_tokens(prompt_b)
        self._check_len(tokens)
        if not isinstance(decode_tokens, int) or decode_tokens < 0:
            raise ValueError(f"decode_tokens must be a non-negative int, got {decode_tokens!r}")
        model, engine = self.model, self.engine
        t0 = self._now()
        ref_logits, ref_cache = forward(model, tokens)
        ttft_full = self._now() - t0
        reference = self._decode(ref_logits, ref_cache, decode_tokens)

        request_id = f"{self.model_name}-request-b-{next(self._requests)}"
        top = list(range(self.num_blocks - 1, self.num_blocks - 1 - self.blocks_per_prompt, -1))
        slots = _slots(top, tokens.numel(), self.block_size)
        top_ids = torch.tensor(top, device=self.spec.device)
        for pages in self.pages:  # poison B's blocks: anything not retrieved shows as NaN
            for page in pages:
                page.index_fill_(0, top_ids, float("nan"))
        t0 = self._now()
        hit = engine.lookup(self.model_name, tokens, request_id=request_id, tp_size=self.tp_size)
        lookup_s = self._now() - t0
        try:
            ranks = [self._serve_rank(rank, tokens, slots, hit, request_id, ref_logits, decode_tokens)
                     for rank in range(self.tp_size)]
        finally:
            engine.free_lookup_locks(request_id)
            engine.end_session(request_id)
        slowest = max(r.retrieve_s + r.rebuild_s + r.suffix_s for r in ranks)
        used = min(r.used_tokens for r in ranks)
        return ReuseResult(self.model_name, self.spec.kind, tokens.numel(), used, lookup_s,
                           lookup_s + slowest, ttft_full, reference, ranks)

    def _serve_rank(self, rank: int, tokens: torch.Tensor, slots: torch.Tensor, hit: int,
                    request_id: str, ref_logits: torch.Tensor, decode_tokens: int) -> RankResult:
        model, pages = self.model, self.pages[rank]
        t0 = self._now()
        got = self.engine.retrieve(self.instance_ids[rank], tokens[:hit], slots[:hit],
                                   request_id=request_id) if hit else 0
        t1 = self._now()
        used = min(got, tokens.numel() - 1)  # a whole-prompt hit still runs the last token
        cache = pages_to_cache(model, pages, slots[:used], used) if used else None
        t2 = self._now()
        logits, cache_after = forward(model, tokens[used:], cache)
        t3 = self._now()
        exact = used > 0 and self._cache_a is not None and all(
            torch.equal(k0, k1) and torch.equal(v0, v1)
            for (k0, v0), (k1, v1) in zip(cache_tokens(model, self._cache_a, used),
                                          cache_tokens(model, cache_after, used)))
        return RankResult(rank, got, used, t1 - t0, t2 - t1, t3 - t2, exact,
                          torch.equal(logits, ref_logits),
                          (logits - ref_logits).abs().max().item(),
                          self._decode(logits, cache_after, decode_tokens))

    def _now(self) -> float:
        if self.spec.device.type == "cuda":
            torch.cuda.synchronize(self.spec.device)
        return time.perf_counter()

    def _decode(self, logits: torch.Tensor, cache: Any, steps: int) -> list[int]:
        out = [int(logits.argmax())]
        for _ in range(steps):
            logits, cache = forward(self.model, torch.tensor(out[-1:]), cache)
            out.append(int(logits.argmax()))
        return out



def make_prompts(num_tokens: int, shared_tokens: int, *, vocab_size: int = 512,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts A and B of ``num_tokens`` each; B repeats A's first ``shared_tokens``."""
    if not 0 <= shared_tokens <= num_tokens or num_tokens <= 0:
        raise ValueError(f"need 0 <= shared_tokens <= num_tokens and num_tokens > 0, "
                         f"got shared_tokens={shared_tokens}, num_tokens={num_tokens}")
    gen = torch.Generator().manual_seed(seed)
    prompt_a = torch.randint(0, vocab_size, (num_tokens,), generator=gen)
    own = torch.randint(0, vocab_size, (num_tokens - shared_tokens,), generator=gen)
    return prompt_a, torch.cat([prompt_a[:shared_tokens], own])


def run_prefix_reuse(engine: Any, model: torch.nn.Module, prompt_a: Any, prompt_b: Any, *,
                     model_name: str, tp_size: int = 1, block_size: int = 16,
                     decode_tokens: int = 4, alloc: Callable | None = None) -> ReuseResult:
    """The whole scenario once: register, store A, serve B (with and without gpukv), unregister."""
    max_tokens = max(len(prompt_a), len(prompt_b))
    with PrefixReuse(engine, model, model_name=model_name, max_tokens=max_tokens, tp_size=tp_size,
                     block_size=block_size, alloc=alloc) as scenario:
        scenario.store(prompt_a)
        return scenario.serve(prompt_b, decode_tokens=decode_tokens)


DEMO_MODELS = {"tiny-deepseek": ("tiny_deepseek", 2), "tiny-llama": ("tiny_llama", 1)}


def run_demo(model_name: str, *, tokens: int = 256, chunk_size: int = 32, shared_fraction: float = 0.75,
             block_size: int = 16, tp_size: int | None = None, decode_tokens: int = 4, repeats: int = 3,
             seed: int = 0, device: str | None = "cpu", server: bool = False) -> int:
    """``gpukv demo --model tiny-deepseek|tiny-llama``: print request B's TTFT with and without
    gpukv (medians of ``repeats`` serves), the tokens served from cache and ``logits identical:
    yes|no``; exit code 0 only if the cache hit and every serve's logits, on every rank, are
    bit-identical to a full prefill. ``server``: through a spawned ``gpukv serve`` (pages in
    shared memory on CPU) instead of an in-process engine.

    B = A's first ``shared_fraction`` of tokens (rounded down to whole chunks) + its own tokens.
    On the tiny DeepSeek (MoE) keep B's own part >= ~48 tokens: shorter suffixes make CPU matmuls
    take other kernels than the full prefill and the logits differ by ~1e-7 (the cache itself
    stays bit-exact, see the ``cache bit-exact`` lines)."""
    from gpukv import CacheEngine, EngineConfig
    from gpukv.integrations import transformers as adapter

    if model_name not in DEMO_MODELS:
        raise ValueError(f"model {model_name!r} is not one of {sorted(DEMO_MODELS)}")
    builder, default_tp = DEMO_MODELS[model_name]
    tp_size = default_tp if tp_size is None else tp_size
    device = device or "cpu"
    shared = int(tokens * shared_fraction) // chunk_size * chunk_size
    model = getattr(adapter, builder)(seed).to(device)
    spec = adapter.kv_spec(model)
    prompt_a, prompt_b = make_prompts(tokens, shared, vocab_size=model.config.vocab_size, seed=seed)
    row = (f"latent {spec.latent_dim} + rope {spec.rope_dim}" if spec.kind == "mla"
           else f"{spec.num_heads} KV heads x {spec.head_dim}")
    dtype = str(spec.dtype).removeprefix("torch.")
    print(f"gpukv demo: {model_name} ({spec.kind.upper()}, {spec.num_layers} layers, {row}, {dtype}), "
          f"pages {spec.dims}, block {block_size}, chunk {chunk_size}, TP={tp_size}"
          f"{', through gpukv serve' if server else ''}")

    def serves(engine: Any, alloc: Callable | None = None) -> list[ReuseResult]:
        with PrefixReuse(engine, model, model_name=model_name, max_tokens=tokens, tp_size=tp_size,
                         block_size=block_size, alloc=alloc) as scenario:
            stored = scenario.store(prompt_a)
            print(f"request A: {tokens} tokens prefilled, {stored} stored by rank 0")
            return [scenario.serve(prompt_b, decode_tokens=decode_tokens) for _ in range(max(1, repeats))]

    if not server:
        results = serves(CacheEngine(EngineConfig(capacity_bytes=256 << 20, device=device,
                                                  chunk_size=chunk_size)))
    else:
        from gpukv.frontend.client import CacheClient
        from gpukv.frontend.process import ServerProcess

        with tempfile.TemporaryDirectory(prefix="gpukv-model-demo-") as tmp:
            address = f"ipc://{tmp}/gpukv.sock"
            with ServerProcess(address, capacity_bytes=256 << 20, device=device, chunk_size=chunk_size), \
                    CacheClient(address, timeout_s=120) as client:
                results = serves(client)
    result = results[-1]
    identical = all(r.logits_identical for r in results)
    ttft_full = statistics.median(r.ttft_full_s for r in results)
    ttft_cached = statistics.median(r.ttft_cached_s for r in results)
    print(f"request B: {tokens} tokens, {shared} shared with A; tokens served from cache: {result.hit_tokens}")
    for r in result.ranks:
        print(f"  rank {r.tp_rank}: retrieved {r.retrieved_tokens} tokens in {r.retrieve_s * 1e3:.2f} ms, "
              f"cache rebuilt in {r.rebuild_s * 1e3:.2f} ms, suffix prefill {r.suffix_s * 1e3:.1f} ms, "
              f"cache bit-exact: {'yes' if r.cache_exact else 'no'}, tokens {r.generated}")
    print(f"  reference (full prefill) tokens {result.reference_generated}")
    print(f"time to first token without cache: {ttft_full * 1e3:.1f} ms (median of {len(results)})")
    print(f"time to first token with cache:    {ttft_cached * 1e3:.1f} ms ({ttft_full / ttft_cached:.2f}x, "
          f"lookup {result.lookup_s * 1e3:.2f} ms)")
    print(f"logits identical: {'yes' if identical else 'no'} "
          f"(max abs diff {max(r.max_abs_diff for r in results):.3g}, {dtype})")
    return 0 if identical and result.hit_tokens > 0 else 1
