"""A torch tensor over raw memory at an address, on a device the caller names (DLPack).

A CUDA arena mapped from another process (an IPC handle opened under this worker's own device)
is a pointer valid in this process's context; torch has no constructor that takes a pointer and
a device and trusts both. A DLPack capsule does: :func:`wrap` builds a ``DLManagedTensor`` for
``nbytes`` of uint8 at ``address`` on ``(device_type, device_id)`` and hands it to
``torch.from_dlpack``. The memory stays the caller's; ``on_free`` (if given) runs once torch
drops the last reference to the tensor's storage (e.g. to close an IPC mapping).
"""

from __future__ import annotations

import ctypes
from typing import Callable

import torch

KDL_CPU, KDL_CUDA = 1, 2
_KDL_UINT = 1
DEVICE_TYPES = {"cpu": KDL_CPU, "cuda": KDL_CUDA}


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    pass


_DELETER = ctypes.CFUNCTYPE(None, ctypes.POINTER(_DLManagedTensor))
_DLManagedTensor._fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p),
                             ("deleter", _DELETER)]

_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]

# The managed tensors torch still holds, by address: their ctypes objects (shape, the struct) and
# the caller's on_free must live until the deleter runs. The registry is per process by nature
# (it backs C memory that torch owns); entries leave it in the deleter.
_LIVE: dict[int, tuple] = {}


@_DELETER
def _delete(managed) -> None:
    entry = _LIVE.pop(ctypes.addressof(managed.contents), None)
    if entry is not None and entry[-1] is not None:
        entry[-1]()


def wrap(address: int, nbytes: int, device_type: str, device_id: int = 0,
         on_free: Callable[[], None] | None = None) -> torch.Tensor:
    """A 1-D uint8 tensor over ``nbytes`` at ``address`` on ``device_type`` ("cpu"/"cuda")
    ``device_id``; no copy, no ownership (see the module docstring)."""
    if device_type not in DEVICE_TYPES:
        raise ValueError(f"device_type must be one of {sorted(DEVICE_TYPES)}, got {device_type!r}")
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0 or not address:
        raise ValueError(f"need a non-null address and nbytes > 0, got {address:#x}, {nbytes!r}")
    shape = (ctypes.c_int64 * 1)(nbytes)
    managed = _DLManagedTensor()
    device = _DLDevice(DEVICE_TYPES[device_type], device_id)
    managed.dl_tensor = _DLTensor(ctypes.c_void_p(address), device, 1, _DLDataType(_KDL_UINT, 8, 1),
                                  shape, None, 0)
    managed.deleter = _delete
    _LIVE[ctypes.addressof(managed)] = (managed, shape, on_free)
    capsule = _capsule_new(ctypes.addressof(managed), b"dltensor", None)
    try:
        return torch.from_dlpack(capsule)
    except BaseException:
        _LIVE.pop(ctypes.addressof(managed), None)
        raise
