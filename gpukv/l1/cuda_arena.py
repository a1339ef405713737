"""GPU arenas shared between processes: created by the server, opened by workers.

The server allocates each GPU arena raw (:class:`gpukv.l1.cuda_driver.CudaDriver`, whatever
torch's allocator settings) on that GPU and exports it as a CUDA IPC handle, described as plain
data (never pickled). A worker opens it under *its own* device: an arena on its own GPU, or on a
peer GPU it sees with peer access (the mapping then reads and writes over NVLink/PCIe P2P, and no
context is ever created on the peer). An arena it cannot reach (a GPU it does not see, no peer
access) is refused with a ValueError before any CUDA call (:mod:`gpukv.l1.topology`). CUDA lets
a process open one exported allocation once per device, so opened arenas are shared by every
client of the process (:class:`Mappings`) and closed when the last tensor over one is dropped.

Arguments ``driver``, ``view`` and ``wrap`` are the real CUDA driver, GPU view and DLPack wrapper
by default; tests pass fakes.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Callable

import torch

from gpukv.l1 import dlpack
from gpukv.l1.topology import UUID_PREFIX, GpuView, TorchGpus, reachable

Wrap = Callable[..., torch.Tensor]


def create(ordinal: int, nbytes: int, *, driver=None, view: GpuView | None = None,
           wrap: Wrap = dlpack.wrap) -> tuple[torch.Tensor, dict, Callable[[], None]]:
    """A zeroed arena of ``nbytes`` on GPU ``ordinal`` (this process's index): its tensor, its
    handle (plain data) and the function that frees it (once no worker maps it any more)."""
    driver = driver or _driver()
    view = view or TorchGpus()
    uuid = next((g.uuid for g in view.gpus() if g.index == ordinal), None)
    if uuid is None:
        raise ValueError(f"cuda:{ordinal} is not visible here ({len(view.gpus())} GPU(s))")
    with driver.on(ordinal):
        ptr = driver.alloc(nbytes)
        try:
            handle = driver.ipc_handle(ptr)
        except BaseException:
            driver.free(ptr)
            raise
    tensor = wrap(ptr, nbytes, "cuda", ordinal)
    tensor.zero_()

    def free() -> None:
        with driver.on(ordinal):
            driver.free(ptr)

    return tensor, dict(kind="cuda_ipc", device_uuid=uuid, ipc_handle=handle, nbytes=nbytes,
                        nonce=os.urandom(8).hex()), free


class _Mapped:
    """One opened allocation: its address here and how many tensors over it are alive."""

    __slots__ = ("ptr", "users", "latest")

    def __init__(self, ptr: int) -> None:
        self.ptr, self.users, self.latest = ptr, 0, None


class Mappings:
    """The GPU arenas this process has opened, by (IPC handle, own device): an arena is opened
    once per device and closed when the last tensor over it (views included) is freed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[tuple[bytes, int], _Mapped] = {}

    def __len__(self) -> int:
        return len(self._open)

    def open(self, handle: dict, device: torch.device, *, driver=None, view: GpuView | None = None,
             wrap: Wrap = dlpack.wrap) -> torch.Tensor:
        """The arena of ``handle`` as a uint8 tensor on ``device`` (this worker's pages' GPU).
        ValueError when this process cannot reach it."""
        if handle.get("kind") != "cuda_ipc":
            raise ValueError(f"not a GPU arena handle: {handle.get('kind')!r}")
        view = view or TorchGpus()
        own = device.index if device.index is not None else torch.cuda.current_device()
        uuids = {g.index: g.uuid for g in view.gpus()}
        if own not in uuids:
            raise ValueError(f"{device} is not visible here")
        arena = UUID_PREFIX + handle["device_uuid"]
        if not reachable(UUID_PREFIX + uuids[own], [arena], view)[0]:
            raise ValueError(f"the arena on GPU {handle['device_uuid']} cannot be read from "
                             f"{device} "
                             "(not visible in this process, or no peer access)")
        driver = driver or _driver()
        key = (bytes(handle["ipc_handle"]), own)
        with self._lock:
            entry = self._open.get(key)
            tensor = entry.latest() if entry is not None and entry.latest is not None else None
            if tensor is not None:
                return tensor
            if entry is None:
                with driver.on(own):
                    entry = self._open[key] = _Mapped(driver.ipc_open(key[0]))
            entry.users += 1
        try:
            tensor = wrap(entry.ptr, int(handle["nbytes"]), "cuda", own,
                          on_free=lambda: self._release(key, entry, driver))
        except BaseException:
            self._release(key, entry, driver)
            raise
        entry.latest = weakref.ref(tensor)
        return tensor

    def _release(self, key: tuple[bytes, int], entry: _Mapped, driver) -> None:
        with self._lock:
            entry.users -= 1
            if entry.users:
                return
            if self._open.get(key) is entry:
                del self._open[key]
        with driver.on(key[1]):
            driver.ipc_close(entry.ptr)


_DRIVER: list = []


def _driver():
    """The process's CUDA driver (loaded once)."""
    if not _DRIVER:
        from gpukv.l1.cuda_driver import CudaDriver

        _DRIVER.append(CudaDriver())
    return _DRIVER[0]


MAPPINGS = Mappings()  # one per process: CUDA allows one mapping of an allocation per device
