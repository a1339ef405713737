"""Arena memory: the one uint8 tensor per device that L1 carves into slots, and how a worker maps
the server's arena into its own process.

CPU, shared (the server): a ``memfd`` sealed against shrinking and growing (``F_SEAL_SHRINK |
F_SEAL_GROW | F_SEAL_SEAL``), so no client that maps it can make the server fault on a truncated
page; a worker opens it through ``/proc/<server pid>/fd/<fd>`` (same user only) and checks the
seals and size before mapping. A server restarted under the same pid (a container's pid 1) gets
the same fd number, so the handle also carries the arena's identity, which cannot repeat: a
random nonce (in the memfd's name too) and the memfd's inode and device. The worker checks both
on the file it opened (a different one is refused), and a handle that differs from the one it
mapped means another arena: it maps that one (``CacheClient.register``).

CPU, private (the embedded engine): anonymous memory with transparent huge pages requested. Both
are *pre-faulted* when created (``MADV_POPULATE_WRITE``, else one write per page), so the first
stores into a fresh L1 do not pay a page fault per 4 KiB (issue 15); that costs one zero fill of
the capacity at start-up.

CUDA: a server's arena is a raw allocation exported as a CUDA IPC handle and opened by workers
under their own device (:mod:`gpukv.l1.cuda_arena`); an embedded engine's is a plain
``torch.empty`` on the device.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import secrets
import stat
import threading
from dataclasses import dataclass, field

import torch

MADV_POPULATE_WRITE = 23  # Linux >= 5.14
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
PAGE = mmap.PAGESIZE


@dataclass(slots=True)
class ArenaMemory:
    """``tensor``: 1-D uint8 of ``nbytes`` on ``device``; ``handle``: how another process of the
    same user maps it (None for private memory)."""

    device: str
    tensor: torch.Tensor
    handle: dict | None = None
    _keep: list = field(default_factory=list, repr=False)  # fds and maps that must outlive it

    def close(self) -> None:
        for item in self._keep:
            if isinstance(item, int):
                os.close(item)
            elif callable(item):  # a GPU arena's free
                item()
        self._keep.clear()


def create(device: str, nbytes: int, *, shared: bool, prefault: bool | str = True) -> ArenaMemory:
    """A new arena of ``nbytes`` on ``device`` ("cpu", "cpu:N" or "cuda[:N]"). ``prefault``:
    True faults every page in before returning, ``"background"`` in a daemon thread (a server
    answers at once; stores before it finished fault the rest themselves), False not at all."""
    if prefault not in (True, False, "background"):
        raise ValueError(f"prefault must be True, False or 'background', got {prefault!r}")
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
        raise ValueError(f"arena size must be a positive int, got {nbytes!r}")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not shared:
            return ArenaMemory(device, torch.empty(nbytes, dtype=torch.uint8, device=dev))
        from gpukv.l1 import cuda_arena

        index = dev.index if dev.index is not None else torch.cuda.current_device()
        tensor, handle, free = cuda_arena.create(index, nbytes)
        return ArenaMemory(device, tensor, handle, [free])
    if dev.type != "cpu":
        raise ValueError(f"arenas live on cpu or cuda devices, got {device!r}")
    size = -(-nbytes // PAGE) * PAGE
    keep: list = []
    if shared:
        nonce = secrets.token_hex(16)
        fd = os.memfd_create(f"gpukv-arena-{device}-{nonce}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        keep.append(fd)
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        mapped = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        st = os.fstat(fd)
        handle = dict(kind="memfd", pid=os.getpid(), fd=fd, nbytes=size, nonce=nonce,
                      inode=st.st_ino, dev=st.st_dev)
    else:
        mapped = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                           mmap.PROT_READ | mmap.PROT_WRITE)
        _advise(mapped, mmap.MADV_HUGEPAGE)
        handle = None
    keep.append(mapped)
    tensor = torch.frombuffer(mapped, dtype=torch.uint8)[:nbytes]
    if prefault == "background":  # madvise only: the write-per-page fallback would race stores
        threading.Thread(target=_advise, args=(mapped, MADV_POPULATE_WRITE),
                         name=f"gpukv-prefault-{device}", daemon=True).start()
    elif prefault:
        populate(mapped, tensor)
    return ArenaMemory(device, tensor, handle, keep)


def populate(mapped: mmap.mmap, tensor: torch.Tensor) -> None:
    """Fault in every page of a mapping (writing), without changing its bytes. The fallback
    (one read-modify-write per page) is safe only while nothing else writes the arena."""
    if not _advise(mapped, MADV_POPULATE_WRITE):
        tensor.view(-1)[::PAGE].add_(0)  # one write per page where the kernel lacks the advice


def open_cpu(handle: dict, *, populate_pages: bool = True) -> tuple[torch.Tensor, mmap.mmap]:
    """Map a server's CPU arena (``handle`` from :func:`create`) in this process.

    Raises ValueError when it is not a sealed memfd of this user of the announced size and
    identity (nonce, inode and device: another arena behind the same pid and fd is refused).
    """
    if handle.get("kind") != "memfd":
        raise ValueError(f"not a CPU arena handle: {handle.get('kind')!r}")
    if not all(k in handle for k in ("nonce", "inode", "dev")):
        raise ValueError("the server's arena handle has no identity (nonce, inode, dev): a gpukv "
                         "serve too old for this client")
    path = f"/proc/{int(handle['pid'])}/fd/{int(handle['fd'])}"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise ValueError(f"cannot open the server's arena {path}: {exc.strerror} (the worker must "
                         "run as the server's user and see its /proc)") from None
    try:
        st = os.fstat(fd)
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            raise ValueError(f"{path} is not a memfd of uid {os.getuid()}")
        if st.st_size != handle["nbytes"] or seals & _SEALS != _SEALS:
            raise ValueError(f"{path}: size {st.st_size} (announced {handle['nbytes']}) or seals "
                             f"{seals:#x} do not match a gpukv arena")
        name = os.readlink(f"/proc/self/fd/{fd}")  # the file opened, not the path again
        if (st.st_ino, st.st_dev) != (handle["inode"], handle["dev"]) or \
                not name.startswith("/memfd:gpukv-arena-") or \
                name.split(" ")[0].rpartition("-")[2] != str(handle["nonce"]):
            raise ValueError(f"{path} is not the arena the server announced (restarted or "
                             "replaced meanwhile): register again")
        flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate_pages else 0)
        mapped = mmap.mmap(fd, st.st_size, flags, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    return torch.frombuffer(mapped, dtype=torch.uint8), mapped


def _advise(mapped: mmap.mmap, advice: int) -> bool:
    try:
        mapped.madvise(advice)
    except OSError:
        return False
    return True
