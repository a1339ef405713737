"""What one prefix-reuse run measured (:mod:`gpukv.testing.prefix_reuse`): request B with and
without gpukv, per TP rank: tokens retrieved and used, times, and whether the cache, the logits
and the greedy tokens are bit-exact."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class RankResult:
    """One TP rank's part of request B (times in seconds)."""

    tp_rank: int
    retrieved_tokens: int  # written into this rank's pages by retrieve
    used_tokens: int  # of those, the prefix the rebuilt cache holds (at most prompt length - 1)
    retrieve_s: float
    rebuild_s: float
    suffix_s: float
    cache_exact: bool  # rebuilt cache == request A's own cache for the hit tokens, bit for bit
    logits_identical: bool  # next-token logits == full prefill of B, bit for bit
    max_abs_diff: float
    generated: list[int]  # greedy: the first token, then the decoded ones


@dataclass(slots=True)
class ReuseResult:
    """Request B with and without gpukv. ``ttft_cached_s`` = lookup + the slowest rank's
    retrieve + rebuild + suffix prefill (ranks run in parallel in a real TP group)."""

    model: str
    kind: str
    prompt_tokens: int
    hit_tokens: int
    lookup_s: float
    ttft_cached_s: float
    ttft_full_s: float
    reference_generated: list[int]
    ranks: list[RankResult] = field(default_factory=list)

    @property
    def logits_identical(self) -> bool:
        return all(r.logits_identical for r in self.ranks)

    @property
    def max_abs_diff(self) -> float:
        return max(r.max_abs_diff for r in self.ranks)

    @property
    def generation_identical(self) -> bool:
        return all(r.generated == self.reference_generated for r in self.ranks)

    @property
    def speedup(self) -> float:
        return self.ttft_full_s / self.ttft_cached_s
