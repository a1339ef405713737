"""Chunks of a shared CPU arena whose pages were punched out from under the server.

Every worker maps the server's memfd read-write, and a mapping can drop pages of the file:
``fallocate(FALLOC_FL_PUNCH_HOLE)`` on ``/proc/<server pid>/fd/<fd>`` or ``madvise(MADV_REMOVE)``
on the worker's own mapping. The seals cannot stop it (only a write seal would, and workers must
write), and the pages then read as zeros: another session's cached KV, silently wrong. Workers are
trusted with the arena (a faulty one could as well write garbage), so this is detection, not
prevention: such a page is gone from the file, and ``mincore`` on the server's own mapping of
the chunk (one call per chunk, bounded to its pages; ``lseek(SEEK_HOLE)`` walks on to the next
hole, the whole rest of a full arena) reports it not resident. A chunk is checked where it must
be whole -- at STORE_COMMIT (the worker just wrote every byte of it) and
at RETRIEVE_BEGIN, before any worker reads it (a read of a hole faults in a zero page, which
hides it). A damaged chunk is not committed / is dropped from L1 and the retrieve writes
nothing (the caller recomputes). What this does not see: a hole punched and then read (by the
spill thread, right after the commit) or written over before the check, and a punch that lands
during a worker's own copy. A page swapped out also reads as not resident: with swap, a chunk
may be dropped for nothing (a miss, never wrong bytes). CUDA arenas have no such file.
"""

from __future__ import annotations

import ctypes
import mmap
from typing import Sequence

from gpukv.l1.memory import ArenaMemory

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_RESIDENT = bytes.maketrans(bytes(range(256)), bytes(b & 1 for b in range(256)))  # bit 0 only
PAGE = mmap.PAGESIZE


class HoleCheck:
    """Which of a list of chunks (``.device``, ``.offset``, ``.nbytes``) lie over a hole."""

    def __init__(self, memories: Sequence[ArenaMemory], enabled: bool = True) -> None:
        self._bases = [m.tensor.data_ptr()
                       if enabled and m.handle and m.handle.get("kind") == "memfd" else None
                       for m in memories]
        self.found = 0  # chunks found damaged so far

    def damaged(self, chunks) -> list:
        """The chunks of ``chunks`` with a page missing anywhere in their bytes."""
        out = [c for c in chunks if self._bases[c.device] is not None
               and has_hole(self._bases[c.device], c.offset, c.nbytes)]
        self.found += len(out)
        return out


def has_hole(base: int, offset: int, nbytes: int) -> bool:
    """Whether a page of ``[offset, offset + nbytes)`` of the mapping at ``base`` is not
    resident (``mincore``)."""
    start = (base + offset) // PAGE * PAGE
    pages = -(-(base + offset + nbytes - start) // PAGE)
    vec = ctypes.create_string_buffer(pages)
    if _libc.mincore(start, pages * PAGE, vec) != 0:
        raise OSError(ctypes.get_errno(), "mincore of the arena failed")
    return vec.raw.translate(_RESIDENT).find(b"\x00") >= 0
