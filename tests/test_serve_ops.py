"""Operations of a real ``gpukv serve``: its HTTP admin (``--http-port``) scraped by a real
Prometheus, ``/status`` against its schema, ``POST /clear``, and its KV events (``--events``)
followed by a subscriber that rebuilds what L1 holds.

One server process for the module; a client in this process registers plain tensors, stores
and looks up a scripted workload whose counts the tests then expect exactly.
"""

from __future__ import annotations

import json
import socket
import urllib.request

import jsonschema
import pytest
import torch

from gpukv.frontend.client import CacheClient
from gpukv.frontend.process import ServerProcess
from gpukv.ops.replay import EventSubscriber, TierState
from gpukv.ops.status import SCHEMA_PATH
from prometheus_server import prometheus_factory  # noqa: F401 - the fixture

CS, LAYERS, BLOCK = 16, 2, 16
MODEL = "dsv3-ops"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str, token: str | None = None, method: str = "GET") -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(url, method=method, headers=headers,
                                     data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The server, its admin URL, a subscriber that joined before any event, and the workload's
    client after: 3 prompts of 4 chunks stored, 5 lookups (hits 4, 4, 2, 0 and 4 chunks)."""
    tmp = tmp_path_factory.mktemp("ops")
    port, events, token_file = _free_port(), f"ipc://{tmp}/events.sock", tmp / "admin.token"
    with ServerProcess(f"ipc://{tmp}/gpukv.sock", capacity_bytes=64 << 20, chunk_size=CS,
                       extra_args=["--http-port", str(port), "--events", events,
                                   "--http-token-file", str(token_file)]) as server:
        subscriber = EventSubscriber(events)
        client = CacheClient(server.address)
        buf = torch.zeros(LAYERS, 64, BLOCK, 576, dtype=torch.bfloat16)
        buf.view(torch.int16).random_(-(1 << 15), 1 << 15)
        client.register("r0", MODEL, [buf[i] for i in range(LAYERS)], "NB,BS,D", kind="mla")
        prompts = [list(range(p * 1000, p * 1000 + 4 * CS)) for p in range(3)]
        for p, prompt in enumerate(prompts):
            assert client.store("r0", prompt, torch.arange(4 * CS) + p * 4 * CS) == 4 * CS
        asks = [prompts[0], prompts[1], prompts[2][:2 * CS] + [7] * 2 * CS, [9] * 4 * CS, prompts[0]]
        hits = [client.lookup(MODEL, ask, request_id=f"q{i}") for i, ask in enumerate(asks)]
        assert hits == [4 * CS, 4 * CS, 2 * CS, 0, 4 * CS]
        for i in range(len(asks)):
            client.end_session(f"q{i}")
        token = token_file.read_text().strip()
        assert oct(token_file.stat().st_mode & 0o777) == "0o600" and len(token) >= 32
        yield dict(server=server, url=f"http://127.0.0.1:{port}", target=f"127.0.0.1:{port}",
                   token=token, token_file=token_file,
                   client=client, subscriber=subscriber, hit_tokens=sum(hits),
                   requested=sum(len(a) for a in asks))
        client.close()


def test_metrics_healthcheck_and_status_answer(served):
    status, body = _get(served["url"] + "/healthcheck")
    assert status == 200  # for anyone who reaches the port
    for path in ("/metrics", "/status"):
        assert _get(served["url"] + path)[0] == 401  # without the token
        assert _get(served["url"] + path, token="x" * 43)[0] == 401
    status, body = _get(served["url"] + "/metrics", served["token"])
    text = body.decode()
    assert status == 200
    assert f'gpukv_lookup_hit_tokens_total{{model="{MODEL}",tier="L1"}} {served["hit_tokens"]}.0' in text
    assert f'gpukv_lookup_requested_tokens_total{{model="{MODEL}"}} {served["requested"]}.0' in text
    status, body = _get(served["url"] + "/status", served["token"])
    document = json.loads(body)
    jsonschema.validate(document, json.loads(SCHEMA_PATH.read_text()))
    # the workload's client, and the one that waited for the server to be ready (not reaped yet)
    assert document["clients"] >= 1 and document["open_requests"] == 0
    assert f"gpukv_connected_clients {document['clients']}.0" in text
    assert document["models"] == [{"name": MODEL, "kind": "mla", "instances": [
        {"instance_id": "r0", "tp_rank": 0, "tp_size": 1, "device": "cpu"}]}]
    assert document["devices"][0]["objects"] == 12


def test_a_real_prometheus_scrapes_the_hit_tokens_the_workload_produced(served, prometheus_factory):  # noqa: F811
    prom = prometheus_factory([served["target"]], credentials_file=served["token_file"])
    prom.poll_until(prom.targets_up, 30, "the gpukv serve target up")
    labels = (("instance", served["target"]), ("job", "gpukv"), ("model", MODEL))
    prom.wait_for(f'gpukv_lookup_hit_tokens_total{{model="{MODEL}"}}', {
        (*labels, ("tier", "L1")): served["hit_tokens"], (*labels, ("tier", "disk")): 0,
        (*labels, ("tier", "remote")): 0})
    prom.wait_for(f'gpukv_lookup_requests_total{{model="{MODEL}"}}', {labels: 5})


def test_kv_events_rebuild_what_l1_holds_and_clear_removes_it(served):
    state = TierState()
    assert served["subscriber"].recv_into(state, 12, timeout_s=10) == 12  # 12 chunks stored
    assert state.complete and len(state.tiers["L1"]) == 12
    assert _get(served["url"] + "/clear", method="POST")[0] == 401
    assert served["client"].stats()["l1"]["objects"] == 12  # nothing cleared
    status, body = _get(served["url"] + "/clear", served["token"], method="POST")
    assert (status, json.loads(body)) == (200, {"cleared": 12})
    assert served["subscriber"].recv_into(state, 12, timeout_s=10) == 12
    assert state.complete and state.tiers["L1"] == set()
    assert served["client"].lookup(MODEL, list(range(4 * CS)), request_id="after") == 0
