"""The server's CUDA arenas, exported as CUDA IPC handles and mapped by worker processes.

Skipped without a GPU (none in CI); written to run unchanged on one (run them with the compiled
kernels: ``GPUKV_TRITON_COMPILED=1``, as ``perf/gpu_check.sh`` does for the kernel tests).
"""

from __future__ import annotations

import pytest
import torch

from frontend_cases import CHUNK, DIMS, RANK_BLOCKS, STORE_BLOCKS, Worker, client, kv_cache, \
    mismatched_tokens, prompt, rows, secret, slots_of
from gpukv.frontend.process import ServerProcess

N = 5 * CHUNK
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


def run_tp2(tmp_path, kind: str, devices: str, rank_devices: tuple[str, str]) -> None:
    """Rank 0 stores (MLA: once for both; MHA: each rank its shard), the scheduler looks up with
    tp_size=2, both ranks retrieve bit-exact through the server's CUDA arena(s)."""
    group, model = secret("cuda"), f"cuda-{kind}"
    workers = [Worker(), Worker()]
    server = ServerProcess(f"ipc://{tmp_path}/gpukv.sock", capacity_bytes=64 << 20, device="cuda",
                           devices=devices, chunk_size=CHUNK)
    try:
        assert server.info["devices"] == devices.split(",")
        with client(server.address, group=group) as sched:
            tokens = prompt(1)
            store_slots = slots_of(STORE_BLOCKS, len(tokens))
            sources = []
            for rank, w in enumerate(workers):
                w("connect", server.address, group=group)
                w("alloc", "kv", kind, seed=10 + rank, device=rank_devices[rank])
                w("register", "kv", "kv", model, kind, rank, 2)  # its GPU's arena (by UUID)
                sources.append(w("rows", "kv", kind, store_slots[:N]))
            for rank, w in enumerate(workers):
                expect = N if rank == 0 or kind == "mha" else 0  # MLA: stored once
                assert w("call", "store", "kv", tokens, store_slots) == expect
            assert sched.lookup(model, tokens, request_id="req", tp_size=2) == N
            for rank, w in enumerate(workers):
                dst = slots_of(RANK_BLOCKS[rank], N)
                assert w("call", "retrieve", "kv", tokens[:N], dst, request_id="req") == N
                want = sources[0 if kind == "mla" else rank]
                assert mismatched_tokens(w("rows", "kv", kind, dst), want) == 0
            for rank in range(1 if kind == "mla" else 2):
                assert sched.read_count(model, tokens, kv_rank=rank) == [0] * 5
    finally:
        for w in workers:
            w.close()
        server.stop()


@cuda
@pytest.mark.parametrize("kind", ["mla", "mha"])
def test_ipc_arena_between_processes_on_one_gpu(tmp_path, kind):
    run_tp2(tmp_path, kind, "cuda:0", ("cuda:0", "cuda:0"))


@two_gpus
def test_a_rank_on_another_gpu_reads_the_mla_object(tmp_path):
    # rank 0 stores into cuda:0's arena; rank 1 (cuda:1) reads it from there (peer or staged)
    run_tp2(tmp_path, "mla", "cuda:0,cuda:1", ("cuda:0", "cuda:1"))


@two_gpus
def test_mha_shards_stay_on_their_ranks_gpus(tmp_path):
    run_tp2(tmp_path, "mha", "cuda:0,cuda:1", ("cuda:0", "cuda:1"))


@cuda
def test_a_store_and_a_retrieve_never_make_the_host_wait_for_the_gpu(tmp_path):
    """With a long kernel queued ahead on the current stream, ``start_store`` and
    ``start_retrieve`` return while the GPU is still busy (pinned, non-blocking copies of the
    slot mapping and offsets; no host sync); ``finish`` waits for the copy's own event only."""
    server = ServerProcess(f"ipc://{tmp_path}/gpukv.sock", capacity_bytes=64 << 20,
                           devices="cuda:0", chunk_size=CHUNK)
    try:
        with client(server.address) as c:
            pages, tokens = kv_cache("mla", 1, device="cuda:0"), prompt(1)
            c.register("r0", "m", pages, "NB,BS,D", kind="mla")
            src = slots_of(STORE_BLOCKS, len(tokens))
            c.store("r0", tokens, src)  # warm-up: kernels compiled, arena mapped
            other = prompt(2)
            torch.cuda._sleep(1 << 30)  # ~0.5-1 s of GPU time ahead of the copy
            started = c.start_store("r0", other, slots_of(RANK_BLOCKS[1], len(other)))
            assert not torch.cuda.current_stream().query() and not started.ready()
            assert c.finish(started) == N
            assert c.lookup("m", tokens, request_id="q") == N
            dst = slots_of(RANK_BLOCKS[0], N)
            torch.cuda._sleep(1 << 30)
            started = c.start_retrieve("r0", tokens[:N], dst, request_id="q")
            assert not torch.cuda.current_stream().query() and not started.ready()
            assert c.finish(started) == N
            assert mismatched_tokens(rows(pages, "mla", dst), rows(pages, "mla", src[:N])) == 0
    finally:
        server.stop()


@two_gpus
def test_copies_run_on_the_pages_device_whatever_device_is_current(tmp_path):
    """Pages on cuda:1 while cuda:0 is current: the launch, its staging copies and its event
    all go to cuda:1 (a device guard around every copy)."""
    server = ServerProcess(f"ipc://{tmp_path}/gpukv.sock", capacity_bytes=64 << 20,
                           devices="cuda:0,cuda:1", chunk_size=CHUNK)
    try:
        with client(server.address) as c, torch.cuda.device(0):
            pages, tokens = kv_cache("mha", 3, device="cuda:1"), prompt(3)
            c.register("r1", "h", pages, DIMS["mha"], kind="mha")
            src = slots_of(STORE_BLOCKS, len(tokens))
            assert c.store("r1", tokens, src) == N
            assert c.lookup("h", tokens, request_id="q") == N
            dst = slots_of(RANK_BLOCKS[0], N)
            assert c.retrieve("r1", tokens[:N], dst, request_id="q") == N
            assert mismatched_tokens(rows(pages, "mha", dst), rows(pages, "mha", src[:N])) == 0
            assert torch.cuda.current_device() == 0
    finally:
        server.stop()
