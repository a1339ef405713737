"""A copy in flight owns its slots: aborts, unregisters, reaps and expired leases in the middle of
a worker's pack or unpack never hand those slots to another client.

In-process server (its loop in a thread), clients in this process. The copy is stopped at a known
point by wrapping ``gpukv.frontend.client.pack``/``unpack``: the wrapper runs the interfering
action, then the real copy. The arena holds exactly 8 chunk slots, so "a store that needs every
slot" shows exactly which slots were handed out (3 free + 5 held by the copy).
"""

from __future__ import annotations

import time

import pytest

import gpukv.engine.copy_job as copy_job_module
from gpukv.frontend.sessions import Limits
from frontend_cases import (CHUNK, DIMS, RANK_BLOCKS, STORE_BLOCKS, chunk_bytes, client, kv_cache,
                            mismatched_tokens, one_shot, prompt, rows, secret, serving, slots_of)

SLOTS = 8
N = 5 * CHUNK  # the prompt's full chunks: 80 tokens


def arena_of_8(tmp_path, slots: int = SLOTS):
    """A server whose arena holds exactly ``slots`` MLA chunks, any client may reserve all."""
    nbytes = slots * chunk_bytes("mla")
    return serving(tmp_path, capacity_bytes=nbytes, limits=Limits(max_reserved_bytes=nbytes))


def flood(seed: int = 2) -> tuple[list[int], object]:
    """A prompt of SLOTS full chunks (one that needs every slot) and its slot mapping."""
    return prompt(seed, SLOTS * CHUNK), slots_of(list(range(SLOTS)), SLOTS * CHUNK)


@pytest.mark.parametrize("abort", ["free", "range_free", "end"])
def test_abort_while_a_rank_unpacks_keeps_its_slots(tmp_path, monkeypatch, abort):
    with arena_of_8(tmp_path) as server:
        group = secret("engine")
        with client(server.address, group=group) as sched, \
                client(server.address, group=group) as rank, client(server.address) as other:
            pages, other_pages = kv_cache("mla", 1), kv_cache("mla", 2)
            rank.register("r0", "m", pages, DIMS["mla"], kind="mla")
            other.register("o", "m", other_pages, DIMS["mla"], kind="mla")
            tokens = prompt(1)
            store_slots = slots_of(STORE_BLOCKS, len(tokens))
            source = rows(pages, "mla", store_slots[:N])
            assert rank.store("r0", tokens, store_slots) == N
            assert sched.lookup("m", tokens, request_id="req") == N
            big, big_slots = flood()
            seen = {}

            def scheduler_aborts_and_another_prompt_arrives():
                if abort == "free":
                    seen["freed"] = sched.free_lookup_locks("req")
                elif abort == "range_free":
                    seen["freed"] = sched.free_lookup_locks("req", start_token=0, end_token=N)
                else:
                    sched.end_session("req")
                    seen["freed"] = 5
                seen["counts"] = sched.read_count("m", tokens)
                seen["stored"] = other.store("o", big, big_slots)

            one_shot(monkeypatch, "unpack", scheduler_aborts_and_another_prompt_arrives)
            dst = slots_of(RANK_BLOCKS[0], N)
            assert rank.retrieve("r0", tokens[:N], dst, request_id="req") == N
            # the rank's pages hold the original prompt's KV, bit for bit
            assert mismatched_tokens(rows(pages, "mla", dst), source) == 0
            assert seen["freed"] == 5 and seen["counts"] == [0] * 5
            # the other store got the 3 free slots, never the 5 pinned ones (no room for the rest)
            assert seen["stored"] == (SLOTS - 5) * CHUNK
            assert sched.read_count("m", tokens) == [0] * 5
            assert sched.stats()["l1"]["pinned"] == 0
            # the new prompt's chunks are intact; once unpinned, the old prompt is evictable (and
            # least recently used): the rest of the new prompt fits
            done, got = (SLOTS - 5) * CHUNK, slots_of(list(range(8, 16)), SLOTS * CHUNK)
            assert other.lookup("m", big, request_id="big") == done
            assert other.retrieve("o", big[:done], got[:done], request_id="big") == done
            assert other.store("o", big, big_slots) == 5 * CHUNK
            assert other.lookup("m", big, request_id="big2") == SLOTS * CHUNK
            assert other.retrieve("o", big, got, request_id="big2") == SLOTS * CHUNK
            assert mismatched_tokens(rows(other_pages, "mla", got),
                                     rows(other_pages, "mla", big_slots)) == 0


@pytest.mark.parametrize("interrupt", ["unregister", "reap", "write_lease"])
def test_interrupted_store_never_shares_the_slots_it_packs(tmp_path, monkeypatch, interrupt):
    with arena_of_8(tmp_path) as server:
        core = server.core
        offset = [0.0]
        monkeypatch.setattr(core.l1, "_clock", lambda: time.monotonic() + offset[0])
        with client(server.address) as writer, client(server.address) as innocent:
            wpages, ipages = kv_cache("mla", 1), kv_cache("mla", 2)
            writer.register("w", "m", wpages, DIMS["mla"], kind="mla")
            innocent.register("i", "m", ipages, DIMS["mla"], kind="mla")
            tokens = prompt(1)
            big, big_slots = flood()
            big_source = rows(ipages, "mla", big_slots)
            seen = {}

            def interrupt_then_another_store():
                if interrupt == "unregister":
                    writer.unregister("w")
                elif interrupt == "reap":  # what the reaper does to a silent session
                    server.sessions.reap(writer.session)
                else:  # the write lease passes
                    offset[0] += core.config.write_lease_s + 1
                    core.expire()
                seen["stored"] = innocent.store("i", big, big_slots)

            one_shot(monkeypatch, "pack", interrupt_then_another_store)
            store_slots = slots_of(STORE_BLOCKS, len(tokens))
            if interrupt == "reap":  # the late commit of a reaped session fails clearly
                with pytest.raises(ValueError, match="session was reaped"):
                    writer.store("w", tokens, store_slots)
            else:
                assert writer.store("w", tokens, store_slots) == 0
            # while the pack ran, its 5 slots were not handed out: the other store got 3
            assert seen["stored"] == (SLOTS - 5) * CHUNK
            # the interrupted store committed nothing
            assert innocent.lookup("m", tokens, request_id="probe") == 0
            # the innocent client's chunks are intact, although the pack wrote after its store
            done = (SLOTS - 5) * CHUNK
            assert innocent.lookup("m", big, request_id="q") == done
            dst = slots_of(list(range(8, 16)), SLOTS * CHUNK)
            assert innocent.retrieve("i", big[:done], dst[:done], request_id="q") == done
            assert mismatched_tokens(rows(ipages, "mla", dst[:done]), rows(ipages, "mla", big_slots[:done])) == 0
            # the pack is over: its slots are free again and the rest of the prompt fits
            stats = innocent.stats()
            assert stats["server"]["orphaned_plans"] == 0
            assert innocent.store("i", big, big_slots) == 5 * CHUNK
            assert innocent.lookup("m", big, request_id="q2") == SLOTS * CHUNK
            assert innocent.retrieve("i", big, dst, request_id="q2") == SLOTS * CHUNK
            assert mismatched_tokens(rows(ipages, "mla", dst), big_source) == 0
            assert stats["l1"]["writing"] == 0


def test_a_late_commit_of_a_reaped_session_never_commits_another_store(tmp_path, monkeypatch):
    """A worker stalls in a pack, its session is reaped, the same client registers again and
    starts a new store: the stalled copy's commit must not commit the new store's plan (whose
    pack has not run: its slots hold stale bytes), and it frees its own slots."""
    import threading

    with arena_of_8(tmp_path, slots=2 * SLOTS) as server:
        with client(server.address) as worker, client(server.address) as reader:
            pages = kv_cache("mla", 1)
            worker.register("w", "m", pages, DIMS["mla"], kind="mla")
            old, new = prompt(1), prompt(3)
            new_slots = slots_of(RANK_BLOCKS[1], len(new))
            real_pack = copy_job_module.pack
            parked, resume, done = threading.Event(), threading.Event(), {}

            def second_pack(*args, **kwargs):
                parked.set()
                assert resume.wait(60)
                real_pack(*args, **kwargs)

            def new_store():
                try:
                    done["n"] = worker.store("w", new, new_slots)
                except Exception as exc:  # noqa: BLE001 - checked below
                    done["error"] = exc

            def reap_register_and_start_a_new_store():
                server.sessions.reap(worker.session)
                worker.register("w", "m", pages, DIMS["mla"], kind="mla")
                monkeypatch.setattr(copy_job_module, "pack", second_pack)
                thread = threading.Thread(target=new_store)
                thread.start()
                assert parked.wait(60)  # the new store holds its plan, its pack not yet run
                done["thread"] = thread

            one_shot(monkeypatch, "pack", reap_register_and_start_a_new_store)
            try:
                with pytest.raises(ValueError, match="reaped"):
                    worker.store("w", old, slots_of(STORE_BLOCKS, len(old)))
                # the new store's chunks are not readable before its own pack has run
                assert reader.lookup("m", new, request_id="early") == 0
            finally:
                resume.set()
                done["thread"].join(60)
            assert done.get("n") == N, done
            assert reader.lookup("m", old, request_id="old") == 0
            assert reader.lookup("m", new, request_id="new") == N
            dst = slots_of(RANK_BLOCKS[0], N)
            reader_pages = kv_cache("mla", 9)
            reader.register("r", "m", reader_pages, DIMS["mla"], kind="mla")
            assert reader.retrieve("r", new[:N], dst, request_id="new") == N
            assert mismatched_tokens(rows(reader_pages, "mla", dst),
                                     rows(pages, "mla", new_slots[:N])) == 0
            # the stalled copy's slots came back with its late commit: nothing stays orphaned
            assert reader.stats()["server"]["orphaned_plans"] == 0
