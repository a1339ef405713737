"""The few CUDA driver calls a shared GPU arena needs, through ctypes on ``libcuda.so.1``.

Why the driver and not torch: torch's caching allocator may hand out memory that CUDA IPC cannot
export (``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``, common with vLLM), torch's IPC path
re-serves a reference counter to every client, and ``rebuild_cuda_tensor`` opens a handle under
the *storing* GPU's device, which creates a context (hundreds of MB) on a GPU the engine already
filled. Here an arena is one raw ``cuMemAlloc`` exported with ``cuIpcGetMemHandle``, and a worker
opens it with ``cuIpcOpenMemHandle(..., CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS)`` in its *own*
device's primary context: CUDA maps a peer GPU's memory into that context and enables peer access
lazily (documented for ``cudaIpcOpenMemHandle``: "maps memory exported from another process ...
into the current device address space"). Every call runs in the primary context of the device
ordinal it is given (the one the CUDA runtime, hence torch, uses).

UNTESTED on a GPU (none in CI): the call sequence is tested against a fake driver; one real run
is in ``perf/gpu_check.sh`` (tests/test_frontend_cuda.py).
"""

from __future__ import annotations

import contextlib
import ctypes
from typing import Iterator

CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 0x1
IPC_HANDLE_BYTES = 64


class _IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * IPC_HANDLE_BYTES)]


class CudaError(RuntimeError):
    """A CUDA driver call failed (its name and error code in the message)."""


class CudaDriver:
    """``libcuda.so.1`` (loaded on first use); methods raise :class:`CudaError`."""

    def __init__(self, lib: ctypes.CDLL | None = None) -> None:
        self._lib = lib or ctypes.CDLL("libcuda.so.1")
        self._check(self._lib.cuInit(0), "cuInit")

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            name = ctypes.c_char_p()
            self._lib.cuGetErrorName(rc, ctypes.byref(name))
            raise CudaError(f"{what} failed: {(name.value or b'?').decode()} ({rc})")

    @contextlib.contextmanager
    def on(self, ordinal: int) -> Iterator[None]:
        """Make device ``ordinal``'s primary context current for the calls inside."""
        dev, ctx = ctypes.c_int(), ctypes.c_void_p()
        self._check(self._lib.cuDeviceGet(ctypes.byref(dev), ordinal), f"cuDeviceGet({ordinal})")
        self._check(self._lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev),
                    "cuDevicePrimaryCtxRetain")
        try:
            self._check(self._lib.cuCtxPushCurrent_v2(ctx), "cuCtxPushCurrent")
            try:
                yield
            finally:
                self._lib.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))
        finally:
            self._lib.cuDevicePrimaryCtxRelease_v2(dev)

    def alloc(self, nbytes: int) -> int:
        ptr = ctypes.c_uint64()
        self._check(self._lib.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(nbytes)),
                    f"cuMemAlloc({nbytes})")
        return ptr.value

    def free(self, ptr: int) -> None:
        self._check(self._lib.cuMemFree_v2(ctypes.c_uint64(ptr)), "cuMemFree")

    def ipc_handle(self, ptr: int) -> bytes:
        handle = _IpcHandle()
        self._check(self._lib.cuIpcGetMemHandle(ctypes.byref(handle), ctypes.c_uint64(ptr)),
                    "cuIpcGetMemHandle")
        return bytes(handle.reserved)

    def ipc_open(self, handle: bytes) -> int:
        if len(handle) != IPC_HANDLE_BYTES:
            raise ValueError(f"a CUDA IPC handle has {IPC_HANDLE_BYTES} bytes, got {len(handle)}")
        ptr = ctypes.c_uint64()
        self._check(self._lib.cuIpcOpenMemHandle_v2(ctypes.byref(ptr), _IpcHandle(handle),
                                                    CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS),
                    "cuIpcOpenMemHandle")
        return ptr.value

    def ipc_close(self, ptr: int) -> None:
        self._check(self._lib.cuIpcCloseMemHandle(ctypes.c_uint64(ptr)), "cuIpcCloseMemHandle")
