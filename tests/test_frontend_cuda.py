"""The server's CUDA arenas, exported as CUDA IPC handles and mapped by worker processes.

Skipped without a GPU (none in CI); written to run unchanged on one (run them with the compiled
kernels: ``GPUKV_TRITON_COMPILED=1``, as ``perf/gpu_check.sh`` does for the kernel tests).
"""

from __future__ import annotations

import pytest
import torch

from frontend_cases import CHUNK, RANK_BLOCKS, STORE_BLOCKS, Worker, client, mismatched_tokens, \
    prompt, secret, slots_of
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
