"""Pages punched out of the shared CPU arena (issue 24 row 8): a worker's
``fallocate(PUNCH_HOLE)`` on the server's memfd, or ``madvise(MADV_REMOVE)`` on its own mapping,
silently zeroed another session's cached KV, which a retrieve then served. The server checks for
holes before anyone reads a chunk: the retrieve writes nothing (the caller recomputes) and the
damaged objects leave L1; a store whose chunks were punched before its commit stores none of
them."""

from __future__ import annotations

import ctypes
import mmap
import os

import pytest

import gpukv.engine.copy_job as copy_job_module
from frontend_cases import (CHUNK, DIMS, RANK_BLOCKS, STORE_BLOCKS, client, kv_cache,
                            mismatched_tokens, prompt, rows, serving, slots_of)

N = 5 * CHUNK
PUNCH_HOLE = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


def punch(server, how: str) -> None:
    """What a hostile or faulty worker can do to the server's arena (every page of it)."""
    handle = server.core.memories[0].handle
    fd = os.open(f"/proc/{handle['pid']}/fd/{handle['fd']}", os.O_RDWR)
    try:
        if how == "fallocate":
            libc = ctypes.CDLL(None, use_errno=True)
            libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
            assert libc.fallocate(fd, PUNCH_HOLE, 0, handle["nbytes"]) == 0, ctypes.get_errno()
        else:
            mapped = mmap.mmap(fd, handle["nbytes"], mmap.MAP_SHARED)
            mapped.madvise(mmap.MADV_REMOVE, 0, handle["nbytes"])
            mapped.close()
    finally:
        os.close(fd)


@pytest.mark.parametrize("how", ["fallocate", "madvise"])
def test_a_retrieve_never_serves_punched_out_kv(tmp_path, how):
    with serving(tmp_path) as server, client(server.address) as victim:
        pages, tokens = kv_cache("mla", 1), prompt(1)
        victim.register("v", "m", pages, DIMS["mla"], kind="mla")
        assert victim.store("v", tokens, slots_of(STORE_BLOCKS, len(tokens))) == N
        assert victim.lookup("m", tokens, request_id="q") == N
        punch(server, how)
        dst = slots_of(RANK_BLOCKS[0], N)
        before = rows(pages, "mla", dst)
        assert victim.retrieve("v", tokens[:N], dst, request_id="q") == 0  # before: N, zeros
        assert mismatched_tokens(rows(pages, "mla", dst), before) == 0  # nothing written
        stats = victim.stats()
        assert stats["l1"]["objects"] == 0 and stats["server"]["punched_chunks"] == 5
        assert victim.lookup("m", tokens, request_id="q2") == 0  # a miss now, never zeros
        # the arena still works: stored again, read back bit-exact
        assert victim.store("v", tokens, slots_of(STORE_BLOCKS, len(tokens))) == N
        assert victim.lookup("m", tokens, request_id="q3") == N
        assert victim.retrieve("v", tokens[:N], dst, request_id="q3") == N
        assert mismatched_tokens(rows(pages, "mla", dst),
                                 rows(pages, "mla", slots_of(STORE_BLOCKS, N))) == 0


def test_a_store_punched_before_its_commit_stores_nothing(tmp_path, monkeypatch):
    with serving(tmp_path) as server, client(server.address) as worker:
        pages, tokens = kv_cache("mla", 2), prompt(2)
        worker.register("w", "m", pages, DIMS["mla"], kind="mla")
        real_wait = copy_job_module.Fence.wait  # the pack is done: punch before the commit
        monkeypatch.setattr(copy_job_module.Fence, "wait",
                            lambda fence: (real_wait(fence), punch(server, "fallocate")))
        assert worker.store("w", tokens, slots_of(STORE_BLOCKS, len(tokens))) == 0
        assert worker.lookup("m", tokens, request_id="q") == 0
        stats = worker.stats()
        assert stats["l1"]["objects"] == 0 and stats["l1"]["used_bytes"] == 0


def test_without_the_check_the_zeros_are_served(tmp_path):
    """What the check prevents (and what the perf sweep's baseline runs)."""
    with serving(tmp_path) as server, client(server.address) as victim:
        server.sessions.handlers.holes = type(server.sessions.handlers.holes)(
            server.core.memories, enabled=False)
        pages, tokens = kv_cache("mla", 1), prompt(1)
        victim.register("v", "m", pages, DIMS["mla"], kind="mla")
        assert victim.store("v", tokens, slots_of(STORE_BLOCKS, len(tokens))) == N
        assert victim.lookup("m", tokens, request_id="q") == N
        punch(server, "fallocate")
        dst = slots_of(RANK_BLOCKS[0], N)
        assert victim.retrieve("v", tokens[:N], dst, request_id="q") == N
        assert mismatched_tokens(rows(pages, "mla", dst),
                                 rows(pages, "mla", slots_of(STORE_BLOCKS, N))) == N
