"""A compiled gather / scatter of fixed-size items, with software prefetch, for the CPU copy path.

Why: numpy's ``take`` / ``put`` move each item with one memmove, and in vLLM's random order every
item starts on a cache line the hardware prefetcher did not see coming (it stops at page
boundaries). Measured on the project's CPU machine (``perf/sweep_copy_floor.py``, 1 thread, x
memcpy of the same bytes): random token slots of 256-2048 B reach 0.32-0.37 with numpy.take and
0.48-0.55 with a plain C loop of memcpy, but 0.63-0.83 when the loop prefetches the item 8 ahead.

Built on first use with the system C compiler (``cc``, as Triton builds its launchers) into a
private cache folder (``$XDG_CACHE_HOME/gpukv`` or ``~/.cache/gpukv``, 0700, owned by this user),
named by a hash of the source, and loaded with ctypes (whose calls release the GIL, so the copy
path's threads still run side by side). Without a compiler, when the build fails, or with
``GPUKV_NATIVE=0``, :func:`native_copy` is None and the CPU path uses numpy (the same bytes,
slower). One call moves a whole list of copies (a chunk's planes, several chunks), so the
per-call cost of ctypes is paid once, not per plane; it checks every index against its item count
before it copies anything.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from gpukv.private_paths import private_folder
from gpukv.tiers.private_files import private_root

log = logging.getLogger(__name__)

AHEAD = 8  # items prefetched ahead of the one being copied (perf/sweep_copy_floor.py)
# larger items (whole blocks of big rows) are not prefetched: each is a long sequential run the
# hardware prefetcher follows, and prefetching 8 of them ahead only evicts what is in use (on the
# project's CPU: MLA 73 KB blocks 0.89 -> 0.93 of memcpy without it; 4 KB blocks gain 0.55 -> 0.65)
PREFETCH_MAX_ITEM = 4096

SOURCE = r"""
#include <stdint.h>
#include <string.h>

static inline void prefetch_item(const char *p, int64_t item, int write) {
    for (int64_t o = 0; o < item; o += 64) {
        if (write) __builtin_prefetch(p + o, 1, 0);
        else __builtin_prefetch(p + o, 0, 0);
    }
}

/* Entry e of n (meta[4e..4e+3]): its items' address, their count, its rows' address, and where
   its counts[e] indices start in idx (entries may share indices). Items of `item` bytes. Every
   index is checked first: returns the first entry with one outside [0, its item count) and
   copies nothing, else -1 after the copies. to_rows: rows[i] = items[idx[i]] (gather), else
   items[idx[i]] = rows[i] (scatter). Prefetches the item `ahead` places ahead. */
int64_t gpukv_move(int64_t n, const int64_t *meta, const int64_t *idx, const int64_t *counts,
                   int64_t item, int64_t ahead, int64_t to_rows) {
    for (int64_t e = 0; e < n; e++) {
        const int64_t limit = meta[4 * e + 1], *x = idx + meta[4 * e + 3];
        for (int64_t i = 0; i < counts[e]; i++)
            if (x[i] < 0 || x[i] >= limit) return e;
    }
    for (int64_t e = 0; e < n; e++) {
        char *items = (char *)(intptr_t)meta[4 * e], *rows = (char *)(intptr_t)meta[4 * e + 2];
        const int64_t count = counts[e], *x = idx + meta[4 * e + 3];
        for (int64_t i = 0; i < count; i++) {
            if (ahead && i + ahead < count)
                prefetch_item(items + x[i + ahead] * item, item, !to_rows);
            if (to_rows) memcpy(rows + i * item, items + x[i] * item, (size_t)item);
            else memcpy(items + x[i] * item, rows + i * item, (size_t)item);
        }
    }
    return -1;
}
"""


class Batch(NamedTuple):
    """Copies prepared for one call of the compiled loop."""

    meta: np.ndarray  # [entries, 4] int64: items address, item count, rows address, idx start
    idx: np.ndarray  # the entries' indices (int64; an entry reads counts[e] from its start)
    counts: np.ndarray  # [entries] int64
    item: int

    def split(self, pieces: int) -> list["Batch"]:
        """The entries cut into ``pieces`` batches (sharing ``idx``), for several threads."""
        n = len(self.counts)
        cuts = [n * k // pieces for k in range(pieces + 1)]
        return [Batch(self.meta[a:b], self.idx, self.counts[a:b], self.item)
                for a, b in zip(cuts, cuts[1:]) if b > a]


class NativeCopy:
    """The compiled loop over opaque items (numpy ``void`` arrays, 1-D and contiguous)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._move = lib.gpukv_move
        self._move.restype = ctypes.c_int64
        self._move.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                               ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]

    @staticmethod
    def batch(entries: list[tuple[int, int, int, np.ndarray]], item: int) -> Batch:
        """``entries`` of (items address, item count, rows address, indices), items of ``item``
        bytes, as one batch (the addresses are trusted: the caller computed them from arrays it
        holds; every index is checked against its item count when the batch runs)."""
        counts = np.fromiter((len(e[3]) for e in entries), np.int64, len(entries))
        meta = np.zeros((len(entries), 4), dtype=np.int64)
        if entries:
            meta[:, :3] = [e[:3] for e in entries]
            meta[1:, 3] = np.cumsum(counts)[:-1]
        idx = np.concatenate([np.asarray(e[3], dtype=np.int64) for e in entries]) if entries \
            else np.zeros(0, np.int64)
        return Batch(meta, idx, counts, item)

    def run(self, batch: Batch, *, to_rows: bool, ahead: int | None = None) -> None:
        """Gather (``to_rows``) or scatter every entry; ValueError naming the first entry with an
        index out of range, and then nothing is copied. ``ahead``: items prefetched ahead
        (default: AHEAD for items up to PREFETCH_MAX_ITEM bytes, else none)."""
        if ahead is None:
            ahead = AHEAD if batch.item <= PREFETCH_MAX_ITEM else 0
        meta, idx = np.ascontiguousarray(batch.meta, np.int64), np.ascontiguousarray(batch.idx, np.int64)
        counts = np.ascontiguousarray(batch.counts, np.int64)
        if meta.shape != (len(counts), 4):
            raise ValueError(f"meta must be [{len(counts)}, 4], got {meta.shape}")
        if len(counts) and ((counts < 0).any() or (meta[:, 3] < 0).any()
                            or (meta[:, 3] + counts > len(idx)).any()):
            raise ValueError("an entry's indices run outside the index array")
        bad = self._move(len(counts), meta.ctypes.data, idx.ctypes.data, counts.ctypes.data,
                         batch.item, ahead, int(to_rows))
        if bad >= 0:
            raise ValueError(f"copy entry {bad}: an index is outside its {batch.meta[bad, 1]} items; "
                             "nothing was copied")

    def gather(self, out: np.ndarray, items: np.ndarray, idx: np.ndarray, ahead: int | None = None) -> None:
        """``out[i] = items[idx[i]]`` (what ``items.take(idx, out=out)`` does)."""
        self.run(self.batch([_entry(items, out, idx)], items.itemsize), to_rows=True, ahead=ahead)

    def scatter(self, items: np.ndarray, idx: np.ndarray, rows: np.ndarray, ahead: int | None = None) -> None:
        """``items[idx[i]] = rows[i]`` (what ``items.put(idx, rows)`` does)."""
        self.run(self.batch([_entry(items, rows, idx)], items.itemsize), to_rows=False, ahead=ahead)


def _entry(items: np.ndarray, rows: np.ndarray, idx: np.ndarray) -> tuple[int, int, int, np.ndarray]:
    """One checked entry over arrays (ValueError naming the problem)."""
    for name, a in (("items", items), ("rows", rows)):
        if a.ndim != 1 or not a.flags.c_contiguous:
            raise ValueError(f"{name} must be a 1-D contiguous array, got shape {a.shape}")
    if items.itemsize != rows.itemsize:
        raise ValueError(f"item sizes differ: {items.itemsize} and {rows.itemsize}")
    if np.ndim(idx) != 1 or len(idx) != len(rows):
        raise ValueError(f"{len(idx)} indices for {len(rows)} rows")
    return items.ctypes.data, len(items), rows.ctypes.data, np.asarray(idx)


_forced_off = False


def native_copy() -> NativeCopy | None:
    """The compiled gather / scatter, built on first use; None where it cannot be (see above)
    and inside :func:`disabled`."""
    return None if _forced_off else _load()


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """The CPU path uses numpy inside this block (benchmarks and tests compare the two; it is
    process-wide, not per thread)."""
    global _forced_off
    before, _forced_off = _forced_off, True
    try:
        yield
    finally:
        _forced_off = before


@functools.lru_cache(maxsize=1)
def _load() -> NativeCopy | None:
    if os.environ.get("GPUKV_NATIVE", "1") == "0":
        return None
    try:
        return NativeCopy(ctypes.CDLL(str(_build())))
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        log.info("no compiled CPU gather (%s): the CPU copy path uses numpy", exc)
        return None


def _cache_folder() -> Path:
    """``$XDG_CACHE_HOME/gpukv`` (or ``~/.cache/gpukv``); where that cannot be created (a
    read-only home), a 0700 folder of this user's under the temp directory."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    try:
        return private_root(Path(cache) / "gpukv", "gpukv cache folder")
    except OSError as exc:
        log.debug("cannot use %s/gpukv (%s): building under the temp directory", cache, exc)
        # each level ours, never a link, no one else may write: no other user can plant a library
        mine = private_folder(Path(tempfile.gettempdir()) / f"gpukv-{os.getuid()}", create=True)
        return private_folder(mine / "native", create=True)


def _build() -> Path:
    folder = _cache_folder()
    digest = hashlib.sha256(SOURCE.encode()).hexdigest()[:16]
    target = folder / f"native-{digest}.so"
    if target.exists() and target.stat().st_uid == os.getuid():
        return target
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise OSError("no C compiler (cc) on the PATH")
    with tempfile.TemporaryDirectory(dir=folder) as tmp:  # builders racing each other: each its own
        source, built = Path(tmp) / "native.c", Path(tmp) / "native.so"
        source.write_text(SOURCE)
        subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(built), str(source)], check=True,
                       capture_output=True, timeout=120)
        os.chmod(built, 0o700)
        os.replace(built, target)  # atomic: a concurrent loader sees the old file or the new one
    return target
