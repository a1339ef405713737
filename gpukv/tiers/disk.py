"""L2 disk tier: one safetensors file per chunk, written off the hot path, LRU within a budget.

Files live at ``<disk_dir>/<aa>/<blake2b(key)>.safetensors`` and carry the self-describing header
of :mod:`gpukv.tiers.codec` (format version, key, layout fingerprint, size, checksum). A new tier
on the same folder indexes the files it finds (warm restart; recency = file mtime). Writes go to a
temporary file in the same folder, then ``os.replace`` (atomic). Files are 0600 in 0700 folders
(policy for an existing root: :mod:`gpukv.tiers.private_files`).

Fail safe: a load never raises. A truncated, corrupted or foreign file is a miss (``corrupt``),
so is any ``OSError`` reading one (``errors``; a vanished file is a plain miss); the entry leaves
the index and a bad file is removed. Renames and removals happen under the tier's lock, so a drop
never deletes a newer file.

Events (``on_event``, :mod:`gpukv.tiers.events`): "stored"/"written" after the atomic rename;
"removed" with "evicted", "corrupt" or "tier_error"; at start-up "stored"/"restart" for every
chunk file found, oldest first (the scan then reads each header; a file whose header is
unreadable or names another key is removed, unannounced).
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from gpukv.tiers import codec as chunk_codec
from gpukv.tiers.events import REMOVED, STORED, EventCallback, TierEvents
from gpukv.tiers.disk_scan import scan
from gpukv.tiers.private_files import private_dir, private_root, write_private
from gpukv.tiers.ratelimit import RateLimitedLog
from gpukv.tiers.writer import BackgroundWriter

log = logging.getLogger(__name__)

_SUFFIX = ".safetensors"
DEFAULT_QUEUE_BYTES = 512 << 20


@dataclass(slots=True)
class _Entry:
    size: int
    generation: int  # tells a re-written file from the one a load read
    key: str | None  # None only for files found at start-up without an on_event callback


class DiskTier:
    """Chunk files under ``root`` with an LRU byte budget and a background writer thread.

    ``queue_size`` / ``queue_bytes`` bound the chunks waiting for the writer (count and payload
    bytes); a chunk past either bound is dropped and counted, never waited for.
    ``on_event(event, key, reason)`` (optional) hears every file stored and removed.
    Thread-safe: any number of threads may call ``submit``/``contains_many``/``load_many``.
    """

    name = "disk"
    local_index = True  # contains_many answers from memory (see gpukv.tiers.fetch)

    def __init__(self, root: str | os.PathLike, *, capacity_bytes: int | None = None,
                 queue_size: int = 256, queue_bytes: int | None = DEFAULT_QUEUE_BYTES,
                 on_event: EventCallback | None = None) -> None:
        if capacity_bytes is not None and (not isinstance(capacity_bytes, int)
                                           or isinstance(capacity_bytes, bool)
                                           or capacity_bytes <= 0):
            raise ValueError("capacity_bytes must be a positive int or None, "
                             f"got {capacity_bytes!r}")
        self._events = TierEvents(on_event, self.name)
        self.root = private_root(root)
        self.capacity_bytes = capacity_bytes
        self._lock = threading.Lock()
        self._index: OrderedDict[str, _Entry] = OrderedDict()  # file name -> entry, LRU first
        self._used = 0
        self._generation = 0
        self._counters = dict(stored=0, dropped=0, hits=0, misses=0, corrupt=0, evicted=0, errors=0)
        self._warn = RateLimitedLog(log, f"disk tier {self.root}: ")
        with self._lock:
            self._scan()
        self._events.deliver()
        # One chunk per batch: a failure of one file never drops its neighbours.
        self._writer = BackgroundWriter(self._write_batch, name="gpukv-disk-writer",
                                        max_items=queue_size, max_bytes=queue_bytes,
                                        batch_size=1, on_drop=self._on_drop)

    # ---- tier interface -------------------------------------------------------------------
    def submit(self, key: str, fingerprint: str, payload: torch.Tensor) -> bool:
        """Queue one chunk (CPU uint8 1-D; the tier owns it now); never blocks.

        False when dropped (queue full by count or bytes, or the tier closed; counted).
        """
        if payload.dtype != torch.uint8 or payload.device.type != "cpu" or payload.dim() != 1:
            raise ValueError(f"payload must be a 1-D CPU uint8 tensor, got {tuple(payload.shape)} "
                             f"{payload.dtype} on {payload.device}")
        return self._writer.submit((key, fingerprint, payload), payload.numel())

    def contains_many(self, keys: list[str]) -> list[bool]:
        with self._lock:
            return [self._file_name(k) in self._index for k in keys]

    def load(self, key: str, fingerprint: str, nbytes: int) -> torch.Tensor | None:
        """The verified payload of ``key`` (CPU uint8, ``nbytes`` long), or None on a miss, a bad
        file or any OSError reading it. Never raises for what is on disk."""
        name = self._file_name(key)
        path = self._path(name)
        with self._lock:
            entry = self._index.get(name)
            if entry is None:
                self._counters["misses"] += 1
                return None
            generation = entry.generation
        try:
            blob = path.read_bytes()
        except FileNotFoundError:  # removed behind our back: a plain miss
            self._drop_bad(name, generation, None, "")
            return None
        except OSError as exc:
            self._drop_bad(name, generation, "errors",
                           f"cannot read {path} for {key} ({type(exc).__name__}: {exc})")
            return None
        payload, reason = chunk_codec.decode(blob, key, fingerprint, nbytes)
        if payload is None:
            self._drop_bad(name, generation, "corrupt", f"bad file {path} for {key}: {reason}")
            return None
        with self._lock:
            self._counters["hits"] += 1
            if name in self._index:
                self._index.move_to_end(name)
        return payload.clone()  # own the memory, not the blob

    def load_many(self, keys: list[str], fingerprint: str, nbytes: int, *,
                  budget_s: float | None = None) -> list[torch.Tensor | None]:
        """``load`` of each key, in order. ``budget_s`` is accepted for the tier interface; local
        reads are not bounded by it."""
        return [self.load(k, fingerprint, nbytes) for k in keys]

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every chunk submitted before the call is written or dropped; False on
        timeout (also when the queue is full)."""
        return self._writer.flush(timeout_s)

    def stats(self) -> dict:
        """Counters (stored, dropped, hits, misses, corrupt, evicted, errors), ``files``,
        ``used_bytes``, ``capacity_bytes``, ``queue_depth``, ``queued_bytes``,
        ``event_errors`` (on_event calls that raised)."""
        writer = self._writer.stats()
        with self._lock:
            out = dict(self._counters, files=len(self._index), used_bytes=self._used,
                       capacity_bytes=self.capacity_bytes)
        out["errors"] += writer["errors"]
        out.update(queue_depth=writer["queued"], queued_bytes=writer["queued_bytes"],
                   event_errors=self._events.errors)
        return out

    def close(self, timeout_s: float | None = 10.0) -> bool:
        """Write what is queued for up to ``timeout_s``, drop (and count) the rest, stop the
        writer. True when everything was written and the writer stopped in time. Idempotent."""
        flushed = self._writer.flush(timeout_s)
        return self._writer.close(timeout_s) and flushed

    # ---- internals ------------------------------------------------------------------------
    @staticmethod
    def _file_name(key: str) -> str:
        return hashlib.blake2b(key.encode(), digest_size=20).hexdigest() + _SUFFIX

    def _path(self, name: str) -> Path:
        return self.root / name[:2] / name

    def _scan(self) -> None:
        found = scan(self.root, _SUFFIX, read_keys=self._events.enabled, file_name=self._file_name)
        for _, name, size, key in found:
            self._index[name] = _Entry(size, self._next_generation(), key)
            self._used += size
            if key is not None:
                self._events.record(STORED, key, "restart")
        if found:
            log.info("disk tier %s: found %d chunk files (%d bytes)", self.root, len(found), self._used)

    def _next_generation(self) -> int:
        self._generation += 1
        return self._generation

    def _forget(self, name: str, reason: str) -> _Entry | None:
        """Drop ``name`` from the index (the lock is held) and record its removal."""
        entry = self._index.pop(name, None)
        if entry is not None:
            self._used -= entry.size
            if entry.key is not None:
                self._events.record(REMOVED, entry.key, reason)
        return entry

    def _unlink_locked(self, path: Path) -> None:
        """Remove ``path`` if it is a file or a link (never a folder); the lock is held."""
        try:
            if stat.S_ISDIR(path.lstat().st_mode):
                self._warn.warning("dir", f"{path} is a directory: left in place")
                return
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            self._warn.warning("unlink", f"cannot remove {path}: {exc}")

    def _drop_bad(self, name: str, generation: int, counter: str | None, message: str) -> None:
        """A load failed: the entry read (``generation``) leaves the index, its path goes."""
        with self._lock:
            self._counters["misses"] += 1
            if counter is not None:
                self._counters[counter] += 1
            entry = self._index.get(name)
            if entry is None or entry.generation != generation:
                return  # evicted or re-written since: not ours to remove
            self._forget(name, "corrupt" if counter == "corrupt" else "tier_error")
            self._unlink_locked(self._path(name))
        self._events.deliver()
        if message:
            self._warn.warning(counter or "miss", f"{message}; dropped it")

    def _on_drop(self, item: tuple, reason: str) -> None:
        if reason == "error":
            return  # counted by the writer, logged there with its traceback
        with self._lock:
            self._counters["dropped"] += 1
        self._warn.warning(reason, f"dropped a chunk ({reason}): {item[0]}")

    def _write_batch(self, batch: list[tuple]) -> None:
        for key, fingerprint, payload in batch:
            try:
                self._write_one(key, fingerprint, payload)
            except OSError as exc:
                with self._lock:
                    self._counters["errors"] += 1
                self._warn.warning("write", f"failed to write {key}: {exc}")

    def _write_one(self, key: str, fingerprint: str, payload: torch.Tensor) -> None:
        name = self._file_name(key)
        with self._lock:
            if name in self._index:
                self._index.move_to_end(name)
                return
        blob = chunk_codec.encode(key, fingerprint, payload)
        if self.capacity_bytes is not None and len(blob) > self.capacity_bytes:
            with self._lock:
                self._counters["dropped"] += 1
            self._warn.warning("budget", f"chunk {key} ({len(blob)} B) exceeds the disk budget")
            return
        path = self._path(name)
        private_dir(path.parent)
        tmp = path.with_name(f"{name}.{threading.get_ident()}.tmp")
        write_private(tmp, blob)
        try:
            with self._lock:
                os.replace(tmp, path)
                self._index[name] = _Entry(len(blob), self._next_generation(), key)
                self._used += len(blob)
                self._counters["stored"] += 1
                self._events.record(STORED, key, "written")
                while self.capacity_bytes is not None and self._used > self.capacity_bytes:
                    victim = next(iter(self._index))
                    self._forget(victim, "evicted")
                    self._counters["evicted"] += 1
                    self._unlink_locked(self._path(victim))
        finally:
            tmp.unlink(missing_ok=True)  # only still there when the rename failed
        self._events.deliver()
