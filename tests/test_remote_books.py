"""``RemoteBooks`` checks every server reply before the data path acts on it.

A reply naming arena -1 or chunk -1 used to be accepted through Python's negative indexing (the
last arena, the last chunk): the copy then went to slots the server never meant. Each malformed
reply below must raise ``ServerError`` and queue no copy.
"""

from __future__ import annotations

import pytest

import gpukv.engine.copy_job as copy_job_module
from frontend_cases import CHUNK, DIMS, STORE_BLOCKS, kv_cache, prompt, slots_of
from gpukv.engine.copies import WorkerCopies
from gpukv.frontend.channel import ServerError
from gpukv.frontend.remote_books import RemoteBooks
from gpukv.l1.memory import create

ARENA = create("cpu", 4 << 20, shared=True, prefault=False)
HANDLE = ARENA.handle


class FakeServer:
    """Answers REGISTER properly and each BEGIN with ``reply``; records what it was asked."""

    def __init__(self, reply: dict) -> None:
        self.reply, self.asked = reply, []

    def __call__(self, body):
        tag = body.__struct_config__.tag
        self.asked.append(tag)
        if tag == "register":
            return dict(device=0, arenas=[HANDLE, HANDLE], chunk_bytes=3 * CHUNK * 1152, kv_rank=0)
        if tag in ("store_commit", "retrieve_end"):
            return 0
        return self.reply


def _copies(reply: dict, monkeypatch) -> tuple[WorkerCopies, FakeServer, list]:
    server = FakeServer(reply)
    copies = WorkerCopies(RemoteBooks(server, CHUNK, ""))
    copies.register("r0", "m", kv_cache("mla", 1), DIMS["mla"], kind="mla")
    queued = []
    for op in ("pack", "unpack"):
        monkeypatch.setattr(copy_job_module, op, lambda *a, **k: queued.append(a))
    return copies, server, queued


GOOD_STORE = dict(plan=7, chunks=[0, 1], offsets=[0, 3 * CHUNK * 1152], devices=[1, 1], cached=0,
                  full=0)
BAD_STORES = {
    "arena -1": dict(GOOD_STORE, devices=[1, -1]),
    "arena past the end": dict(GOOD_STORE, devices=[2, 1]),
    "arena not an int": dict(GOOD_STORE, devices=["0", 1]),
    "devices shorter": dict(GOOD_STORE, devices=[1]),
    "chunk -1": dict(GOOD_STORE, chunks=[-1, 1]),
    "chunk past the prompt": dict(GOOD_STORE, chunks=[0, 9]),
    "chunks repeated": dict(GOOD_STORE, chunks=[1, 1]),
    "offsets shorter": dict(GOOD_STORE, offsets=[0]),
    "offset negative": dict(GOOD_STORE, offsets=[0, -16]),
    "chunks missing": dict(GOOD_STORE, chunks=None),
}


@pytest.mark.parametrize("case", sorted(BAD_STORES))
def test_a_malformed_store_begin_reply_is_refused_and_nothing_is_packed(case, monkeypatch):
    copies, server, queued = _copies(BAD_STORES[case], monkeypatch)
    tokens = prompt(1)
    with pytest.raises(ServerError):
        copies.store("r0", tokens, slots_of(STORE_BLOCKS, len(tokens)))
    assert queued == []


def test_the_good_store_reply_packs_into_the_arena_it_names(monkeypatch):
    copies, server, queued = _copies(GOOD_STORE, monkeypatch)
    tokens = prompt(1)
    copies.store("r0", tokens, slots_of(STORE_BLOCKS, len(tokens)))
    assert len(queued) == 1 and queued[0][3].tolist() == GOOD_STORE["offsets"]
    assert server.asked == ["register", "store_begin", "store_commit"]


GOOD_READ = dict(plan=8, devices=[0, 1], offsets=[0, 3 * CHUNK * 1152])
BAD_READS = {
    "arena -1": dict(GOOD_READ, devices=[0, -1]),
    "fewer chunks than asked": dict(GOOD_READ, devices=[0], offsets=[0]),
    "offset not an int": dict(GOOD_READ, offsets=[0, 1.5]),
}


@pytest.mark.parametrize("case", sorted(BAD_READS))
def test_a_malformed_retrieve_begin_reply_is_refused_and_nothing_is_unpacked(case, monkeypatch):
    copies, server, queued = _copies(BAD_READS[case], monkeypatch)
    tokens = prompt(2)[:2 * CHUNK]
    with pytest.raises(ServerError):
        copies.retrieve("r0", tokens, slots_of(STORE_BLOCKS, len(tokens)), request_id="q")
    assert queued == []


def test_a_register_reply_without_arenas_or_with_a_bad_device_is_refused():
    for reply in (dict(device=0, arenas=[], chunk_bytes=1), dict(device=-1, arenas=[HANDLE], chunk_bytes=1),
                  dict(device=0, arenas=[HANDLE], chunk_bytes=0), "ok"):
        copies = WorkerCopies(RemoteBooks(lambda body, reply=reply: reply, CHUNK, ""))
        with pytest.raises(ServerError):
            copies.register("r0", "m", kv_cache("mla", 1), DIMS["mla"], kind="mla")
        assert not copies.registered("r0")
