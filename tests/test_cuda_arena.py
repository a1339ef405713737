"""GPU arenas across processes, against a fake CUDA driver: which context each call runs in, one
mapping per allocation and device, closed with the last tensor over it, and no CUDA call at all
for an arena the worker cannot reach. (A real GPU runs tests/test_frontend_cuda.py.)

The fake driver hands out real CPU memory as "device" memory, and the fake wrap builds real
DLPack tensors over it (on the CPU), so tensor lifetimes and deleters are torch's own.
"""

from __future__ import annotations

import contextlib
import gc
import mmap
import ctypes

import pytest

from gpukv.l1 import dlpack
from gpukv.l1.cuda_arena import Mappings, create
from gpukv.l1.topology import FakeGpus

import torch

NODE = ["u0", "u1", "u2"]


class FakeDriver:
    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.current: list[int] = []
        self._memory: dict[int, mmap.mmap] = {}
        self._handles: dict[bytes, int] = {}

    @contextlib.contextmanager
    def on(self, ordinal):
        self.current.append(ordinal)
        try:
            yield
        finally:
            self.current.pop()

    def _log(self, *call):
        self.calls.append((self.current[-1] if self.current else None, *call))

    def alloc(self, nbytes):
        m = mmap.mmap(-1, nbytes)
        ptr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        self._memory[ptr] = m
        self._log("alloc", nbytes)
        return ptr

    def free(self, ptr):
        self._log("free")

    def ipc_handle(self, ptr):
        handle = ptr.to_bytes(8, "little") * 8
        self._handles[handle] = ptr
        self._log("ipc_handle")
        return handle

    def ipc_open(self, handle):
        self._log("ipc_open")
        return self._handles[handle]

    def ipc_close(self, ptr):
        self._log("ipc_close")


def fake_wrap(seen):
    def wrap(ptr, nbytes, device_type, device_id, on_free=None):
        seen.append((device_type, device_id))
        return dlpack.wrap(ptr, nbytes, "cpu", 0, on_free=on_free)
    return wrap


def test_the_server_allocates_raw_on_its_gpu_and_exports_plain_data():
    driver, seen = FakeDriver(), []
    tensor, handle, free = create(1, 4096, driver=driver, view=FakeGpus(NODE), wrap=fake_wrap(seen))
    assert driver.calls == [(1, "alloc", 4096), (1, "ipc_handle")]  # in GPU 1's context
    assert seen == [("cuda", 1)] and tensor.numel() == 4096 and int(tensor.sum()) == 0
    assert handle["kind"] == "cuda_ipc" and handle["device_uuid"] == "u1" and handle["nbytes"] == 4096
    assert len(handle["ipc_handle"]) == 64 and len(handle["nonce"]) == 16
    assert set(map(type, handle.values())) <= {str, bytes, int}  # msgpack-able, nothing pickled
    free()
    assert driver.calls[-1] == (1, "free")
    with pytest.raises(ValueError, match="cuda:5 is not visible"):
        create(5, 4096, driver=driver, view=FakeGpus(NODE))


def test_a_worker_opens_a_peer_arena_in_its_own_context_once_and_closes_it_with_the_last_tensor():
    driver, seen = FakeDriver(), []
    _, handle, _ = create(2, 4096, driver=driver, view=FakeGpus(NODE), wrap=fake_wrap([]))
    driver.calls.clear()
    maps = Mappings()
    first = maps.open(handle, torch.device("cuda:0"), driver=driver, view=FakeGpus(NODE), wrap=fake_wrap(seen))
    again = maps.open(handle, torch.device("cuda:0"), driver=driver, view=FakeGpus(NODE), wrap=fake_wrap(seen))
    assert again is first  # a second client of the process: the same mapping
    assert driver.calls == [(0, "ipc_open")]  # under the worker's own GPU 0, never GPU 2
    assert seen == [("cuda", 0)]  # the tensor is on the worker's device: the peer memory mapped there
    view = first[128:256]
    del first, again
    gc.collect()
    assert driver.calls == [(0, "ipc_open")] and len(maps) == 1  # a view still uses it
    del view
    gc.collect()
    assert driver.calls == [(0, "ipc_open"), (0, "ipc_close")] and len(maps) == 0
    reopened = maps.open(handle, torch.device("cuda:0"), driver=driver, view=FakeGpus(NODE),
                         wrap=fake_wrap(seen))
    assert driver.calls[-1] == (0, "ipc_open") and reopened.numel() == 4096  # opened again


@pytest.mark.parametrize("view, why", [
    (FakeGpus(["u0", "u1"]), "not visible"),  # the arena's GPU is hidden from this worker
    (FakeGpus(NODE, peers=[]), "no peer access"),  # PCIe without P2P
])
def test_an_arena_the_worker_cannot_reach_is_refused_before_any_cuda_call(view, why):
    driver = FakeDriver()
    handle = dict(kind="cuda_ipc", device_uuid="u2", ipc_handle=b"\0" * 64, nbytes=4096, nonce="0" * 16)
    with pytest.raises(ValueError, match="cannot be read from cuda:0"):
        Mappings().open(handle, torch.device("cuda:0"), driver=driver, view=view, wrap=fake_wrap([]))
    assert driver.calls == []


def test_the_arena_on_the_workers_own_gpu_is_opened_there():
    driver, seen = FakeDriver(), []
    _, handle, _ = create(1, 4096, driver=driver, view=FakeGpus(NODE), wrap=fake_wrap([]))
    driver.calls.clear()
    arena = Mappings().open(handle, torch.device("cuda:1"), driver=driver, view=FakeGpus(NODE),
                            wrap=fake_wrap(seen))
    assert driver.calls == [(1, "ipc_open")] and seen == [("cuda", 1)] and arena.numel() == 4096
