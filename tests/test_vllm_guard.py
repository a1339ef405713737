"""The connector's best-effort calls (:mod:`gpukv.integrations.vllm.guard`), without vLLM: what a
failing server costs (a miss, a failed load, a skipped store), the quiet period after a timeout,
and that bugs on this side are not swallowed."""

from __future__ import annotations

import logging

import pytest

from gpukv.errors import Busy
from gpukv.frontend.client import ServerError, ServerUnavailable
from gpukv.integrations.vllm.guard import GuardedClient
from vllm_pages import Clock


class Scripted:
    """A client whose next call of each method raises what the test put in ``raises``."""

    chunk_size = 32

    def __init__(self) -> None:
        self.raises: dict[str, BaseException] = {}
        self.sent: list[str] = []

    def __getattr__(self, name: str):
        def call(*args, **kwargs):
            self.sent.append(name)
            exc = self.raises.pop(name, None)
            if exc is not None:
                raise exc
            return {"lookup": 64, "retrieve": 64, "store": 32, "free_lookup_locks": 2}.get(name)
        return call


def test_a_failing_server_costs_a_miss_and_is_counted():
    raw, clock = Scripted(), Clock()
    guarded = GuardedClient(raw, clock=clock)
    raw.raises = {"lookup": Busy("busy"), "retrieve": ServerError("boom"),
                  "store": ValueError("unknown instance 'x': REGISTER it first")}
    assert guarded.lookup("m", [1], request_id="r") == 0
    assert guarded.retrieve("i", [1], None, request_id="r") == 0
    assert guarded.store("i", [1], None) == 0
    assert dict(guarded.failures) == {"lookup": 1, "retrieve": 1, "store": 1}
    # the next calls go through again (only a timeout starts a quiet period)
    assert guarded.lookup("m", [1], request_id="r") == 64 and guarded.store("i", [1], None) == 32
    assert guarded.chunk_size == 32


def test_after_a_timeout_nothing_is_sent_for_retry_s():
    raw, clock = Scripted(), Clock()
    guarded = GuardedClient(raw, retry_s=30.0, clock=clock)
    raw.raises["lookup"] = ServerUnavailable("no answer")
    assert guarded.lookup("m", [1], request_id="r") == 0
    sent = len(raw.sent)
    clock.t = 29.9
    assert guarded.retrieve("i", [1], None, request_id="r") == 0
    assert guarded.end_session("r") is None and guarded.free_lookup_locks("r") == 0
    assert len(raw.sent) == sent and dict(guarded.skipped) == {"retrieve": 1, "end_session": 1,
                                                               "free_lookup_locks": 1}
    clock.t = 30.0
    assert guarded.retrieve("i", [1], None, request_id="r") == 64


def test_value_errors_of_bookkeeping_calls_and_type_errors_are_not_swallowed():
    raw = Scripted()
    guarded = GuardedClient(raw, clock=Clock())
    raw.raises["free_lookup_locks"] = ValueError("bad token range")
    with pytest.raises(ValueError, match="bad token range"):
        guarded.free_lookup_locks("r", start_token=5)
    raw.raises["retrieve"] = TypeError("slot_mapping must be a tensor")
    with pytest.raises(TypeError):
        guarded.retrieve("i", [1], None, request_id="r")
    raw.raises["register"] = ServerUnavailable("down")
    with pytest.raises(ServerUnavailable):  # a worker that cannot register says so at start
        guarded.register("i", "m", [], "NB,BS,D")
    assert not guarded.failures


def test_failures_are_logged_once_then_rate_limited(caplog):
    raw, clock = Scripted(), Clock()
    guarded = GuardedClient(raw, clock=clock)
    with caplog.at_level(logging.WARNING, logger="gpukv.integrations.vllm.guard"):
        for t in (0.0, 1.0, 2.0, 61.0):
            clock.t = t
            raw.raises["store"] = Busy("busy")
            guarded.store("i", [1], None)
    levels = [r.levelname for r in caplog.records]
    assert levels == ["ERROR", "WARNING"] and "4 gpukv failures" in caplog.records[1].getMessage()
