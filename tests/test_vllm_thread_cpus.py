"""Where a vLLM worker's gpukv threads run (:mod:`gpukv.integrations.vllm.thread_cpus`): the
engine's OpenMP binding read from the variables vLLM-CPU sets (its exact forms, from
``vllm/utils/ompmultiprocessing.py``), the CPUs left free, the setting, and real threads moved:
a copy thread, and the client's socket and ping threads started under :meth:`starting`, while
the calling thread keeps its own mask."""

from __future__ import annotations

import logging
import os
import threading

import pytest

from gpukv.integrations.vllm.config import ConnectorConfig
from gpukv.integrations.vllm.thread_cpus import ThreadCpus, bound_cpus, choose, parse_cpu_list, sibling_bound
from gpukv.integrations.vllm.transfers import Job, Transfer, Transfers

MINE = frozenset(os.sched_getaffinity(0))
two_cpus = pytest.mark.skipif(len(MINE) < 2, reason="needs a process allowed on 2 CPUs")


def _mask(native_id: int) -> frozenset[int]:
    return frozenset(os.sched_getaffinity(native_id))


@pytest.mark.parametrize("text, cpus", [
    ("0", {0}), ("0,2-4", {0, 2, 3, 4}), ("0 1 2", {0, 1, 2}), ("{0,1,5}", {0, 1, 5}),
    ("{0},{1}", {0, 1}), ("0-6:2", {0, 2, 4, 6}), (" 3 ", {3})])
def test_cpu_lists_in_every_form_vllm_and_the_openmp_runtimes_write(text, cpus):
    assert parse_cpu_list(text) == cpus


@pytest.mark.parametrize("text", ["", "a", "1-", "3-1", "0-4:0", "1.5", "{}"])
def test_a_bad_cpu_list_is_refused_naming_it(text):
    with pytest.raises(ValueError, match="not a CPU list"):
        parse_cpu_list(text)


@pytest.mark.parametrize("env, bound", [
    ({"KMP_AFFINITY": "granularity=fine,explicit,proclist=[0,1,2]", "OMP_NUM_THREADS": "3"}, {0, 1, 2}),
    ({"GOMP_CPU_AFFINITY": "4 5"}, {4, 5}),
    ({"OMP_PLACES": "{2,3}", "OMP_PROC_BIND": "true"}, {2, 3}),
    ({}, None),  # a GPU platform, or VLLM_CPU_OMP_THREADS_BIND=nobind: nothing bound
    ({"OMP_PLACES": "cores"}, None),  # an abstract place name: not a binding this can read
])
def test_the_engines_openmp_binding_is_read_from_vllms_variables(env, bound):
    assert bound_cpus(env) == (None if bound is None else frozenset(bound))


def test_an_unreadable_binding_is_logged_and_moves_nothing(caplog):
    with caplog.at_level(logging.WARNING, logger="gpukv.integrations.vllm.thread_cpus"):
        assert bound_cpus({"GOMP_CPU_AFFINITY": "zero"}) is None
    assert any("cannot read the engine's OpenMP binding" in r.getMessage() for r in caplog.records)


def test_auto_takes_the_cpus_the_engine_keeps_free_but_the_one_left_to_its_own_processes():
    allowed = frozenset({0, 1, 2, 3, 4})
    assert choose("auto", frozenset({0, 1}), allowed)[0] == {3, 4}
    assert choose("auto", frozenset({0, 1, 2}), allowed)[0] == {4}  # vLLM's default: 2 reserved
    for bound in ({0, 1, 2, 3}, {0, 1, 2, 3, 4}):  # one core free (it runs the scheduler), or none
        cpus, why = choose("auto", frozenset(bound), allowed)
        assert cpus is None and "VLLM_CPU_NUM_OF_RESERVED_CPU >= 2" in why
    assert choose("auto", None, allowed) == (None, "the engine binds no OpenMP threads")
    assert choose("inherit", frozenset({0}), allowed)[0] is None
    assert choose(frozenset({3}), frozenset({0}), allowed)[0] == {3}
    cpus, why = choose(frozenset({7}), frozenset({0}), allowed)  # not this worker's to use
    assert cpus is None and "[7]" in why


def test_auto_leaves_the_cores_of_the_engines_other_workers_alone():
    allowed = frozenset(range(6))  # TP=2: rank 0 on {0, 1}, rank 1 on {3, 4}
    assert choose("auto", frozenset({0, 1}), allowed, frozenset({3, 4}))[0] == {5}
    assert choose("auto", frozenset({0, 1}), allowed, frozenset({2, 3, 4}))[0] is None  # one left


def test_the_sibling_workers_bindings_are_read_from_their_environment():
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                             env={"PATH": os.environ.get("PATH", ""), "GOMP_CPU_AFFINITY": "3 5"})
    try:  # (Popen returns once the child has exec'd: its environment is the one given)
        assert sibling_bound(parent=os.getpid(), me=-1) >= {3, 5}
        assert not sibling_bound(parent=os.getpid(), me=child.pid) & {3, 5}  # itself: not a sibling
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("value, parsed", [
    ("auto", "auto"), ("inherit", "inherit"), ("1,3-4", frozenset({1, 3, 4})), ([1, 3], frozenset({1, 3}))])
def test_the_setting_accepts_auto_inherit_and_cpu_lists(value, parsed):
    cfg = ConnectorConfig.from_extra_config({"gpukv.worker_cpus": value}, kv_role="kv_both")
    assert cfg.worker_cpus == parsed
    assert ConnectorConfig.from_extra_config({}, kv_role="kv_both").worker_cpus == "auto"


@pytest.mark.parametrize("value", ["fast", [], [-1], [True], ["1"], 1, "1-"])
def test_a_bad_setting_is_refused_naming_the_value(value):
    with pytest.raises(ValueError, match="gpukv.worker_cpus must be one of"):
        ConnectorConfig.from_extra_config({"gpukv.worker_cpus": value}, kv_role="kv_both")


@two_cpus
def test_a_copy_thread_runs_on_the_placement_and_the_caller_keeps_its_own():
    forward, free = min(MINE), MINE - {min(MINE)}
    cpus = ThreadCpus.for_worker(free, env={"GOMP_CPU_AFFINITY": str(forward)}, allowed=MINE)
    assert cpus.cpus == free
    seen: list[frozenset[int]] = []

    def run(job: Job) -> Transfer:
        seen.append(frozenset(os.sched_getaffinity(0)))
        transfer = Transfer(job.op, job.request_id, 0, 0, 0.0)
        job.end(transfer)
        return transfer

    transfers = Transfers(thread_init=cpus.enter)
    try:
        job = transfers.submit(Job("store", "r", 0), run)
        assert job.done.wait(10)
        assert transfers.background(lambda: frozenset(os.sched_getaffinity(0))).result(10) == free
    finally:
        transfers.close()
    assert seen == [free]
    assert frozenset(os.sched_getaffinity(0)) == MINE


@two_cpus
def test_threads_started_under_starting_inherit_the_placement_and_the_caller_gets_its_mask_back():
    free = MINE - {min(MINE)}
    cpus = ThreadCpus(frozenset(free))
    ready, stop = threading.Event(), threading.Event()
    thread = threading.Thread(target=lambda: (ready.set(), stop.wait(10)), daemon=True)
    with cpus.starting():
        assert frozenset(os.sched_getaffinity(0)) == free
        thread.start()
    assert frozenset(os.sched_getaffinity(0)) == MINE
    ready.wait(10)
    try:
        assert _mask(thread.native_id) == free
    finally:
        stop.set()
        thread.join(10)


def test_a_placement_the_system_refuses_is_logged_and_dropped(caplog):
    cpus = ThreadCpus(frozenset({max(MINE) + 4096}))  # no such CPU here
    with caplog.at_level(logging.WARNING, logger="gpukv.integrations.vllm.thread_cpus"):
        with cpus.starting():
            assert frozenset(os.sched_getaffinity(0)) == MINE
    assert cpus.cpus is None and frozenset(os.sched_getaffinity(0)) == MINE
    assert any("cannot move a worker thread" in r.getMessage() for r in caplog.records)


def _threads() -> dict[int, str]:
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            out[int(tid)] = open(f"/proc/self/task/{tid}/comm").read().strip()
        except OSError:
            continue
    return out


@two_cpus
def test_the_workers_client_starts_its_socket_and_ping_threads_on_the_placement(tmp_path):
    from frontend_cases import serving
    from gpukv.integrations.vllm.sides import connect

    free = MINE - {min(MINE)}
    with serving(tmp_path) as server:
        before = _threads()
        cfg = ConnectorConfig(address=server.config.address, autostart=False)
        client, _, why = connect(cfg, cfg.address, "g" * 16, ThreadCpus(frozenset(free)))
        try:
            assert why is None and frozenset(os.sched_getaffinity(0)) == MINE
            new = {tid: name for tid, name in _threads().items() if tid not in before}
            ping = next(t for t in threading.enumerate() if t.name == "gpukv-client-ping")
            assert ping.native_id in new and _mask(ping.native_id) == free
            sockets = [tid for tid, name in new.items() if name.startswith("ZMQbg")]
            assert sockets and all(_mask(tid) == free for tid in sockets)  # the I/O (and reaper) threads
        finally:
            client.close()


def test_a_placement_that_cannot_be_read_moves_nothing(monkeypatch):
    from gpukv.integrations.vllm import thread_cpus

    def broken() -> frozenset[int]:
        raise OSError("no affinity here")

    monkeypatch.setattr(thread_cpus, "allowed_cpus", broken)
    cpus = ThreadCpus.for_worker("auto", env={"GOMP_CPU_AFFINITY": "0"})
    assert cpus.cpus is None and "OSError: no affinity here" in cpus.why
