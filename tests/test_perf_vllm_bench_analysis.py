"""The vLLM benchmark's analysis helpers (perf/bench_timeline.py, perf/vllm_scrape.py) on
hand-built inputs whose answers are known."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "perf"))
from bench_timeline import timeline_stats  # noqa: E402
from vllm_scrape import engine_numbers, parse  # noqa: E402


def test_timeline_splits_tpot_into_decode_steps_and_stalls():
    # request 0: 9 gaps of 10 ms and one 100 ms stall; request 1: 10 gaps of 10 ms
    result = dict(start_times=[0.0, 0.5], ttfts=[0.1, 0.1],
                  itls=[[0.01] * 9 + [0.1], [0.01] * 10])
    got = timeline_stats(result)
    assert got["decode_gap_p50_ms"] == pytest.approx(10.0)
    assert got["tpot_steady_ms"] == pytest.approx(10.0)
    # request 0's stall costs 90 ms beyond a decode gap over 10 gaps: 9 ms; request 1: 0
    assert got["tpot_stall_ms"] == pytest.approx(4.5)
    assert got["stalls_per_req"] == pytest.approx(0.5)
    assert got["paired_starts"] == 0.0


def test_timeline_counts_requests_sent_together():
    result = dict(start_times=[0.0, 0.005, 1.0, 2.0, 2.01], ttfts=[0.1] * 5, itls=[[0.01, 0.01]] * 5)
    assert timeline_stats(result)["paired_starts"] == pytest.approx(4 / 5)


def test_timeline_refuses_a_result_without_details():
    with pytest.raises(ValueError, match="save-detailed"):
        timeline_stats({"completed": 3})


PAGE = """# HELP vllm:iteration_tokens_total Histogram of number of tokens per engine_step.
vllm:iteration_tokens_total_bucket{engine="0",le="1.0",model_name="m"} %(one)s
vllm:iteration_tokens_total_bucket{engine="0",le="8.0",model_name="m"} %(eight)s
vllm:iteration_tokens_total_bucket{engine="0",le="+Inf",model_name="m"} %(all)s
vllm:iteration_tokens_total_count{engine="0",model_name="m"} %(all)s
vllm:iteration_tokens_total_sum{engine="0",model_name="m"} 999.0
vllm:request_prefill_time_seconds_sum{engine="0",model_name="m"} %(prefill)s
vllm:request_prefill_time_seconds_count{engine="0",model_name="m"} %(requests)s
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 100.0
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 25.0
"""


def test_scrape_counts_steps_between_two_pages():
    before = PAGE % dict(one=4, eight=4, all=5, prefill=0.1, requests=1)  # the warm-up request
    after = PAGE % dict(one=14, eight=54, all=65, prefill=0.9, requests=5)
    got = engine_numbers(after, before)
    assert got["steps"] == 60
    assert got["decode_steps_1"] == 10 and got["decode_steps_2plus"] == 40
    assert got["decode_batch_mean"] == pytest.approx((10 + 80) / 50)
    assert got["prefill_mean_ms"] == pytest.approx(200.0)
    assert got["prefix_hit_rate"] == 0.0  # the counters did not move between the pages
    assert engine_numbers(after)["prefix_hit_rate"] == pytest.approx(0.25)


def test_scrape_sums_label_sets_and_skips_comments():
    got = parse('# TYPE x counter\nx_total{a="1"} 2.0\nx_total{a="2"} 3.0\nh_bucket{le="1.0",a="1"} 4\n')
    assert got == {"x_total": 5.0, 'h_bucket{le="1.0"}': 4.0}


def test_null_connector_asks_again_as_often_as_told_then_misses():
    """The benchmark's control connector: ``null.ask_again`` "ask again later" answers per
    request, then 0; a finished request's count goes; a bad setting is refused."""
    from types import SimpleNamespace

    pytest.importorskip("vllm")
    from gpukv.testing.vllm_null import NullConnector

    def connector(extra):
        config = SimpleNamespace(kv_transfer_config=SimpleNamespace(kv_connector_extra_config=extra))
        return NullConnector(config, None, None)

    null = connector({"null.ask_again": 2})
    request = SimpleNamespace(request_id="r1")
    assert [null.get_num_new_matched_tokens(request, 0) for _ in range(3)] == [(None, False)] * 2 + [(0, False)]
    assert null.request_finished(request, []) == (False, None)
    assert null.get_num_new_matched_tokens(request, 0) == (None, False)  # a new request of that id
    assert connector({}).get_num_new_matched_tokens(request, 0) == (0, False)
    with pytest.raises(ValueError, match="null.ask_again"):
        connector({"null.ask_again": -1})


def test_paired_ratios_compare_each_repeat_with_its_own_baseline():
    from paired import paired_ratios

    rows = [dict(arm="b", seed=1, tpot=10.0), dict(arm="d", seed=1, tpot=10.5),
            dict(arm="d", seed=2, tpot="21.0"), dict(arm="b", seed=2, tpot="20.0"),  # a CSV's strings
            dict(arm="b", seed=3, tpot=30.0)]  # d did not run in repeat 3: not paired
    (row,) = paired_ratios(rows, "b", ["tpot"])
    assert (row["arm"], row["repeats"], row["min"], row["max"]) == ("d", 2, 1.05, 1.05)
    assert row["median"] == pytest.approx(1.05) and row["sd"] == pytest.approx(0.0)
    # medians per arm would mix the drift between repeats in: d's 15.75 against b's 20.0
    assert paired_ratios(rows, "x", ["tpot"]) == []
