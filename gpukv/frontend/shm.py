"""Worker KV tensors in shared-memory files, so a ``gpukv serve`` process can map them (CPU).

On CPU a worker allocates its paged KV cache with :class:`ShmAllocator` instead of
``torch.empty``: each tensor lives in its own file ``/dev/shm/gpukv-<pid>-<random>`` (owner-only,
mode 0600), mapped shared. :meth:`gpukv.CacheClient.register` finds the file from the tensor's
storage and sends only its path, offset, dtype, shape and strides; the server maps the same file
(:mod:`gpukv.frontend.worker_memory`) and its store/retrieve kernels read and write the worker's pages in
place. Files are unlinked by :meth:`ShmAllocator.close` (or at interpreter exit); the mappings
stay valid in every process that holds them. The files of a worker killed with SIGKILL are
removed by the server's reaper (:func:`remove_stale`: the pid in the name is gone).
"""

from __future__ import annotations

import os
import secrets
import stat
import weakref
from pathlib import Path

import torch

from gpukv.frontend.protocol import ShmTensor

SHM_DIR = "/dev/shm"
PREFIX = "gpukv-"


class ShmAllocator:
    """Allocates tensors in owner-only shared-memory files; ``close()`` unlinks them all.

    ``directory`` must be a tmpfs (``/dev/shm``, the default) for the pages to stay in memory;
    the server only maps files under its own shm directory (same default).
    """

    def __init__(self, directory: str | os.PathLike = SHM_DIR) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ValueError(f"shared-memory directory {str(self.directory)!r} does not exist")
        self._paths: list[str] = []
        self._finalizer = weakref.finalize(self, _unlink_all, self._paths)

    def empty(self, shape: tuple[int, ...] | list[int], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialized contiguous tensor of ``shape``/``dtype`` in a new shared file."""
        shape = tuple(int(s) for s in shape)
        if any(s < 0 for s in shape):
            raise ValueError(f"shape must be non-negative, got {shape}")
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        path = str(self.directory / f"{PREFIX}{os.getpid()}-{secrets.token_hex(8)}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(fd, max(1, nbytes))  # an empty file cannot be mapped
        finally:
            os.close(fd)
        self._paths.append(path)
        flat = torch.from_file(path, shared=True, size=max(1, nbytes), dtype=torch.uint8)
        return flat[:nbytes].view(dtype).view(shape)

    def zeros(self, shape: tuple[int, ...] | list[int], dtype: torch.dtype) -> torch.Tensor:
        return self.empty(shape, dtype).zero_()

    @property
    def paths(self) -> list[str]:
        """Files allocated and not yet unlinked."""
        return list(self._paths)

    def close(self) -> None:
        """Unlink every file (tensors stay usable here; new mappings by path are impossible)."""
        _unlink_all(self._paths)

    def __enter__(self) -> "ShmAllocator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _unlink_all(paths: list[str]) -> None:
    while paths:
        try:
            os.unlink(paths.pop())
        except FileNotFoundError:
            pass


def shm_handle(tensor: torch.Tensor) -> ShmTensor:
    """The wire description of a CPU tensor that lives in a shared-memory file.

    Raises ``ValueError`` when ``tensor`` is not backed by a file (allocate it with
    :class:`ShmAllocator`): a plain ``torch.empty`` tensor cannot be shared with the server.
    """
    if tensor.device.type != "cpu":
        raise ValueError(f"shm_handle needs a CPU tensor, got one on {tensor.device}")
    path = tensor.untyped_storage().filename
    if not path:
        raise ValueError(f"tensor of shape {tuple(tensor.shape)} is not in a shared-memory file: "
                         "allocate worker KV caches with gpukv.frontend.shm.ShmAllocator to use a server")
    return ShmTensor(path=path, offset_bytes=tensor.storage_offset() * tensor.element_size(),
                     dtype=str(tensor.dtype).removeprefix("torch."), shape=list(tensor.shape),
                     stride=list(tensor.stride()))


def pid_of(path: str | os.PathLike) -> int | None:
    """The creating pid in a ``gpukv-<pid>-<random>`` file name, else ``None``."""
    parts = Path(path).name.split("-")
    if len(parts) != 3 or parts[0] + "-" != PREFIX or not parts[1].isdigit():
        return None
    return int(parts[1])


def remove_stale(directory: str | os.PathLike = SHM_DIR) -> list[str]:
    """Unlink this user's ``gpukv-<pid>-*`` files whose pid no longer exists; returns them."""
    removed = []
    uid = os.getuid()
    for entry in Path(directory).glob(f"{PREFIX}*"):
        pid = pid_of(entry)
        if pid is None or _alive(pid):
            continue
        try:
            st = entry.lstat()
            if stat.S_ISREG(st.st_mode) and st.st_uid == uid:
                entry.unlink()
                removed.append(str(entry))
        except FileNotFoundError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
