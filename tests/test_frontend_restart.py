"""A server restarted under the same pid (common in containers: pid 1, or a reused pid) gets a
memfd with the same fd number; its arena handle must still differ, so a worker maps the new arena
instead of writing into the dead server's (issue 24 row 1), and a worker that opens the fd of
another arena than the one announced refuses it.

In-process servers: both have this test's pid; ``os.memfd_create`` is steered onto the dead
server's fd number, as it happens by itself when nothing else opened an fd meanwhile.
"""

from __future__ import annotations

import os

import pytest

import gpukv.l1.memory as memory
from frontend_cases import (CHUNK, DIMS, RANK_BLOCKS, STORE_BLOCKS, client, kv_cache,
                            mismatched_tokens, prompt, rows, serving, slots_of)

N = 5 * CHUNK


def test_a_worker_remaps_after_a_restart_with_the_same_pid_and_fd(tmp_path, monkeypatch):
    address = f"ipc://{tmp_path}/gpukv.sock"
    pages, tokens = kv_cache("mla", 1), prompt(1)
    with serving(tmp_path, address=address) as first:
        worker = client(address)
        worker.register("w", "m", pages, DIMS["mla"], kind="mla")
        old = dict(first.core.memories[0].handle)
    try:
        real = os.memfd_create

        def on_the_old_number(name, flags=os.MFD_CLOEXEC):
            fd = real(name, flags)
            if fd != old["fd"]:
                os.dup2(fd, old["fd"], inheritable=False)
                os.close(fd)
            return old["fd"]

        monkeypatch.setattr(memory.os, "memfd_create", on_the_old_number)
        with serving(tmp_path, address=address) as second:
            new = second.core.memories[0].handle
            assert (new["pid"], new["fd"], new["nbytes"]) == (old["pid"], old["fd"], old["nbytes"])
            worker.register("w", "m", pages, DIMS["mla"], kind="mla")  # what a worker does
            assert worker.store("w", tokens, slots_of(STORE_BLOCKS, len(tokens))) == N
            with client(address) as fresh:  # another worker reads what was stored
                other = kv_cache("mla", 2)
                fresh.register("f", "m", other, DIMS["mla"], kind="mla")
                assert fresh.lookup("m", tokens, request_id="q") == N
                dst = slots_of(RANK_BLOCKS[0], N)
                assert fresh.retrieve("f", tokens[:N], dst, request_id="q") == N
                assert mismatched_tokens(rows(other, "mla", dst),
                                         rows(pages, "mla", slots_of(STORE_BLOCKS, N))) == 0
            assert new != old  # its identity (a nonce, the memfd's inode) cannot repeat
    finally:
        worker.close()


@pytest.mark.parametrize("field", ["nonce", "inode"])
def test_opening_another_arena_than_the_announced_one_is_refused(field):
    arena = memory.create("cpu", 1 << 16, shared=True, prefault=False)
    try:
        handle = dict(arena.handle)
        tensor, mapped = memory.open_cpu(handle)  # the announced one maps
        assert tensor.numel() == handle["nbytes"]
        del tensor
        mapped.close()
        handle[field] = "0" * 32 if field == "nonce" else handle["inode"] + 1
        with pytest.raises(ValueError, match="not the arena the server announced"):
            memory.open_cpu(handle)
        with pytest.raises(ValueError, match="no identity"):
            memory.open_cpu({k: v for k, v in arena.handle.items() if k != field})
    finally:
        arena.close()
