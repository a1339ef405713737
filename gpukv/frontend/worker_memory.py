"""Worker KV tensors shared zero-copy with the server: describing them (worker) and mapping them
(server).

CPU: the tensors live in shared-memory files (:mod:`gpukv.frontend.shm`); the server maps the same file and
views it with the worker's offset, shape and strides. It only maps regular files of its own user,
mode 0600, named ``gpukv-*`` directly under its shm directory, opened without following links: a
client cannot make the server write into an arbitrary file.

CUDA: the tensors travel as CUDA IPC handles (the fields of
``torch.multiprocessing.reductions.reduce_tensor`` as plain bytes and ints, never pickled); the
GPU is identified by its UUID, since device indices differ between processes. UNTESTED: no GPU in
CI; written against torch 2.x ``rebuild_cuda_tensor``.
"""

from __future__ import annotations

import mmap
import os
import stat
from pathlib import Path

import torch

from gpukv.frontend.protocol import CudaIpcTensor, ShmTensor, TensorHandle
from gpukv.frontend.shm import PREFIX, SHM_DIR, shm_handle


def describe(tensor: torch.Tensor) -> TensorHandle:
    """The wire handle of one worker KV tensor (CPU: shared-memory file; CUDA: IPC handle)."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"kv_caches must hold torch.Tensors, got {type(tensor).__name__}")
    if tensor.device.type == "cpu":
        return shm_handle(tensor)
    if tensor.device.type == "cuda":
        return _cuda_handle(tensor)
    raise ValueError(f"cannot share a tensor on {tensor.device} with a gpukv server")


def _cuda_handle(tensor: torch.Tensor) -> CudaIpcTensor:  # UNTESTED (no GPU in CI)
    from torch.multiprocessing.reductions import reduce_tensor

    _, args = reduce_tensor(tensor.detach())
    (_, size, stride, offset, _, dtype, device, handle, storage_size_bytes, storage_offset_bytes,
     _, ref_counter_handle, ref_counter_offset, event_handle, event_sync_required) = args
    return CudaIpcTensor(
        device_index=int(device), device_uuid=str(torch.cuda.get_device_properties(device).uuid),
        ipc_handle=bytes(handle), storage_size_bytes=int(storage_size_bytes),
        storage_offset_bytes=int(storage_offset_bytes),
        ref_counter_handle=bytes(ref_counter_handle),
        ref_counter_offset=int(ref_counter_offset), event_handle=bytes(event_handle or b""),
        event_sync_required=bool(event_sync_required), dtype=str(dtype).removeprefix("torch."),
        shape=list(size), stride=list(stride), offset=int(offset))


class WorkerMemory:
    """The server's mappings of one registered instance's tensors; dropped by :meth:`close`."""

    def __init__(self, handles: list[TensorHandle], *,
                 shm_dir: str | os.PathLike = SHM_DIR) -> None:
        self.shm_dir = Path(shm_dir)
        self._maps: dict[str, torch.Tensor] = {}  # path -> uint8 view of the whole file
        self.tensors: list[torch.Tensor] = [self._open(i, h) for i, h in enumerate(handles)]
        self.paths = sorted(self._maps)

    def _open(self, index: int, handle: TensorHandle) -> torch.Tensor:
        dtype = getattr(torch, handle.dtype)
        if isinstance(handle, ShmTensor):
            return self._open_shm(index, handle, dtype)
        return _open_cuda(index, handle, dtype)

    def _open_shm(self, index: int, h: ShmTensor, dtype: torch.dtype) -> torch.Tensor:
        where = f"tensors[{index}] ({h.path!r})"
        path = Path(h.path)
        if path.parent != self.shm_dir or not path.name.startswith(PREFIX) or ".." in path.parts:
            raise ValueError(f"{where}: only {PREFIX}* files directly under {str(self.shm_dir)!r} "
                             "can be mapped")
        flat = self._maps.get(h.path)
        if flat is None:
            flat = self._maps[h.path] = _map_file(path, where)
        itemsize = torch.empty((), dtype=dtype).element_size()
        if h.offset_bytes % itemsize:
            raise ValueError(f"{where}: offset_bytes {h.offset_bytes} is not a multiple of the "
                             f"{h.dtype} item size {itemsize}")
        end = h.offset_bytes + _extent(h.shape, h.stride) * itemsize
        if end > flat.numel():
            raise ValueError(f"{where}: shape {h.shape} stride {h.stride} at offset "
                             f"{h.offset_bytes} needs {end} bytes, the file has {flat.numel()}")
        whole = flat[: flat.numel() // itemsize * itemsize].view(dtype)
        return whole.as_strided(h.shape, h.stride, h.offset_bytes // itemsize)

    def close(self) -> None:
        """Drop the mappings (memory is unmapped once no kernel holds a view any more)."""
        self.tensors = []
        self._maps.clear()


def _map_file(path: Path, where: str) -> torch.Tensor:
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise ValueError(f"{where}: cannot open: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise ValueError(f"{where}: must be a regular file of uid {os.getuid()} with mode "
                             f"0600, got mode {oct(st.st_mode)} uid {st.st_uid}")
        if st.st_size == 0:
            raise ValueError(f"{where}: file is empty")
        mapped = mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    return torch.frombuffer(mapped, dtype=torch.uint8)  # the tensor keeps the mapping alive


def _extent(shape: list[int], stride: list[int]) -> int:
    """Elements spanned by a strided view (0 when empty)."""
    if any(s == 0 for s in shape):
        return 0
    return 1 + sum((s - 1) * st for s, st in zip(shape, stride))


def _open_cuda(index: int, h: CudaIpcTensor, dtype: torch.dtype) -> torch.Tensor:  # UNTESTED
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    if not torch.cuda.is_available():
        raise ValueError(f"tensors[{index}]: a CUDA IPC handle, but this server has no GPU")
    device = _local_device(h)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if (h.offset + _extent(h.shape, h.stride)) * itemsize > h.storage_size_bytes:
        raise ValueError(f"tensors[{index}]: shape {h.shape} stride {h.stride} offset {h.offset} "
                         f"exceeds the shared storage of {h.storage_size_bytes} bytes")
    with torch.cuda.device(device):
        return rebuild_cuda_tensor(
            torch.Tensor, torch.Size(h.shape), tuple(h.stride), h.offset, torch.UntypedStorage,
            dtype, device, h.ipc_handle, h.storage_size_bytes, h.storage_offset_bytes, False,
            h.ref_counter_handle, h.ref_counter_offset, h.event_handle or None,
            h.event_sync_required)


def _local_device(h: CudaIpcTensor) -> int:  # UNTESTED
    uuids = [str(torch.cuda.get_device_properties(i).uuid)
             for i in range(torch.cuda.device_count())]
    if h.device_uuid:
        if h.device_uuid not in uuids:
            raise ValueError(f"GPU {h.device_uuid} of the worker is not visible to the server "
                             f"(visible: {uuids})")
        return uuids.index(h.device_uuid)
    if h.device_index >= len(uuids):
        raise ValueError(f"worker device index {h.device_index} is not visible to the server")
    return h.device_index
