"""Every deployment shape of a GPU node, simulated with fake device views (no GPU needed).

A node has 8 GPUs with UUIDs ``u0..u7``. Each scenario says what the server process and each
worker process see (``CUDA_VISIBLE_DEVICES``), which arenas the server makes, which arena each
TP rank's stores go to, and whether its MLA cache is shared by the group or kept per rank.
"""

from __future__ import annotations

import pytest

from gpukv.l1.topology import (FakeGpus, arena_index, arena_name, mla_shared, reachable,
                               server_devices, visible)

NODE = [f"u{i}" for i in range(8)]
NVLINK = FakeGpus(NODE)  # every pair has peer access
PCIE_NO_P2P = FakeGpus(NODE, peers=[])
ISLANDS = FakeGpus(NODE, peers=[(a, b) for g in (NODE[:4], NODE[4:]) for a in g for b in g])


def serve(node, env: str | None, requested=None) -> list[str]:
    """The arenas' wire names of a ``gpukv serve`` started with ``CUDA_VISIBLE_DEVICES=env``."""
    view = visible(node, env, NODE)
    return [arena_name(d, view) for d in server_devices(requested, view)]


def worker(node, env: str | None, local_rank: int) -> tuple[str, FakeGpus]:
    """A worker process's view and the wire name of its pages' GPU (``cuda:<local_rank>``)."""
    view = visible(node, env, NODE)
    return arena_name(f"cuda:{local_rank}", view), view


def test_tp1_on_a_one_gpu_machine():
    node = FakeGpus(["solo"])
    view = visible(node, None, ["solo"])
    arenas = [arena_name(d, view) for d in server_devices(None, view)]
    assert arenas == ["cuda-uuid:solo"]
    own = arena_name("cuda:0", view)
    assert arena_index(arenas, own) == 0 and mla_shared(own, arenas, view)


def test_tp8_on_8_gpus_one_arena_each_and_mla_shared_over_all():
    arenas = serve(NVLINK, None)
    assert arenas == [f"cuda-uuid:u{i}" for i in range(8)]
    for rank in range(8):
        own, view = worker(NVLINK, None, rank)
        assert arena_index(arenas, own) == rank  # each rank stores into its own GPU's arena
        assert reachable(own, arenas, view) == [True] * 8
        assert mla_shared(own, arenas, view)


def test_an_engine_pinned_to_gpus_4_to_7_and_the_server_it_starts():
    env = "4,5,6,7"  # the engine's CUDA_VISIBLE_DEVICES, kept by autostart
    arenas = serve(NVLINK, env)
    assert arenas == [f"cuda-uuid:u{i}" for i in (4, 5, 6, 7)]  # not GPU 0: another job's
    for rank in range(4):
        own, view = worker(NVLINK, env, rank)
        assert own == f"cuda-uuid:u{4 + rank}"
        assert arena_index(arenas, own) == rank and mla_shared(own, arenas, view)


def test_what_the_old_autostart_did_to_a_pinned_engine_fails_with_a_clear_message():
    # the server lost CUDA_VISIBLE_DEVICES and was told "--device cuda": one arena on GPU 0
    arenas = serve(NVLINK, None, requested=["cuda"])
    assert arenas == ["cuda-uuid:u0"]
    own, _ = worker(NVLINK, "4,5,6,7", 0)
    with pytest.raises(ValueError, match="no arena for device 'cuda-uuid:u4'.*gpukv serve --devices"):
        arena_index(arenas, own)


def test_a_user_started_server_on_some_gpus_serves_those_only():
    arenas = serve(NVLINK, None, requested=["cuda:0", "cuda:1"])
    assert arenas == ["cuda-uuid:u0", "cuda-uuid:u1"]
    own, _ = worker(NVLINK, None, 2)
    with pytest.raises(ValueError, match="no arena"):  # that rank runs uncached
        arena_index(arenas, own)
    assert serve(NVLINK, None, requested=["all"]) == serve(NVLINK, None)
    assert serve(NVLINK, None, requested=["cuda-uuid:u3"]) == ["cuda-uuid:u3"]


def test_one_container_per_gpu_keeps_mla_per_rank():
    arenas = serve(NVLINK, None)  # the server's container sees the whole node
    for rank in range(8):
        own, view = worker(NVLINK, str(rank), 0)  # each worker sees only its own GPU
        assert own == f"cuda-uuid:u{rank}"
        assert arena_index(arenas, own) == rank
        assert reachable(own, arenas, view) == [i == rank for i in range(8)]
        assert not mla_shared(own, arenas, view)  # it could not read a peer's object


def test_pcie_without_peer_access_keeps_mla_per_rank():
    arenas = serve(PCIE_NO_P2P, None)
    own, view = worker(PCIE_NO_P2P, None, 3)
    assert reachable(own, arenas, view) == [i == 3 for i in range(8)]
    assert not mla_shared(own, arenas, view)


def test_two_nvlink_islands_behind_one_server():
    arenas = serve(ISLANDS, None)
    own, view = worker(ISLANDS, None, 1)
    assert reachable(own, arenas, view) == [True] * 4 + [False] * 4
    assert not mla_shared(own, arenas, view)
    island = serve(ISLANDS, "0,1,2,3")  # a server started by an engine on the first island
    own, view = worker(ISLANDS, "0,1,2,3", 1)
    assert mla_shared(own, island, view)


def test_cpu_pages_use_cpu_arenas():
    arenas = ["cpu", "cuda-uuid:u0"]
    view = FakeGpus(NODE[:1])
    assert arena_index(arenas, None) == 0 and arena_index(arenas, "cpu") == 0
    assert reachable("cpu", arenas, view) == [True, False]
    assert mla_shared("cpu", arenas, view)
    assert server_devices(None, FakeGpus([])) == ["cpu"]
    with pytest.raises(ValueError, match="sees no GPU"):
        server_devices(["all"], FakeGpus([]))


def test_bad_device_names_are_refused_with_what_is_visible():
    view = visible(NVLINK, "2", NODE)
    with pytest.raises(ValueError, match="sees 1 GPU"):
        arena_name("cuda:1", view)
    with pytest.raises(ValueError, match=r"u5 is not visible here \(visible: \['u2'\]\)"):
        arena_name("cuda-uuid:u5", view)
    with pytest.raises(ValueError, match="cannot be combined"):
        server_devices(["all", "cuda:0"], view)
