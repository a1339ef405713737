"""A worker side without gpukv (:mod:`gpukv.integrations.vllm.unconnected`): each load its
scheduler planned is reported failed once -- by block with one KV cache group, by request with
several -- an asynchronous one also reported received, and every fence released at once."""

from __future__ import annotations

import numpy as np

from gpukv.integrations.vllm.plan import LoadSpec, StepPlan
from gpukv.integrations.vllm.unconnected import UnconnectedWorker


def _plan(step: int, *loads: tuple[str, list[int]], released=()) -> StepPlan:
    specs = [LoadSpec(rid, [b"h" * 16], np.array([blocks], dtype=np.int32), list(blocks)) for rid, blocks in loads]
    return StepPlan(step, loads=specs, released=list(released))


def test_one_groups_planned_loads_are_reported_failed_by_block_once():
    side = UnconnectedWorker(num_groups=1, async_loads=False)
    plan = _plan(1, ("a", [3, 4]), ("b", [7]), released=["old"])
    side.preempted(plan)
    side.load(plan)
    assert side.finished(plan) == ({"old"}, set())
    assert side.take_failed_blocks() == {3, 4, 7} and side.take_failed_blocks() == set()
    assert side.take_failed_requests() == set()


def test_asynchronous_loads_are_also_reported_received_so_vllm_stops_waiting():
    side = UnconnectedWorker(num_groups=1, async_loads=True)
    plan = _plan(1, ("a", [3]))
    side.load(plan)
    assert side.finished(plan) == (set(), {"a"})
    assert side.finished(_plan(2)) == (set(), set())
    assert side.take_failed_blocks() == {3}


def test_several_groups_report_the_requests_never_their_blocks():
    side = UnconnectedWorker(num_groups=2, async_loads=True)
    plan = _plan(1, ("a", [3]), ("b", [5]))
    side.load(plan)
    assert side.take_failed_blocks() == set()
    assert side.take_failed_requests() == {"a", "b"} and side.take_failed_requests() == set()
    assert side.finished(plan) == (set(), {"a", "b"})
