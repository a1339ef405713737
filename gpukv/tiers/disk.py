"""L2 disk tier: one safetensors file per chunk, written off the hot path, LRU within a budget.

Files live at ``<disk_dir>/<aa>/<blake2b(key)>.safetensors`` and carry the self-describing header
of :mod:`gpukv.tiers.codec` (format version, key, layout fingerprint, size, checksum). A new tier
on the same folder indexes the files it finds (warm restart; recency = file mtime). Writes go to a
temporary file in the same folder, then ``os.replace`` (atomic). A truncated, corrupted or foreign
file is a miss: it is logged, removed, and never reaches a worker's pages.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from gpukv.tiers import codec as chunk_codec
from gpukv.tiers.ratelimit import RateLimitedLog
from gpukv.tiers.writer import BackgroundWriter

log = logging.getLogger(__name__)

_SUFFIX = ".safetensors"
DEFAULT_QUEUE_BYTES = 512 << 20


class DiskTier:
    """Chunk files under ``root`` with an LRU byte budget and a background writer thread.

    ``queue_size`` / ``queue_bytes`` bound the chunks waiting for the writer (count and payload
    bytes); a chunk past either bound is dropped and counted, never waited for.
    """

    name = "disk"

    def __init__(self, root: str | os.PathLike, *, capacity_bytes: int | None = None,
                 queue_size: int = 256, queue_bytes: int | None = DEFAULT_QUEUE_BYTES) -> None:
        if capacity_bytes is not None and capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be positive or None, got {capacity_bytes!r}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.capacity_bytes = capacity_bytes
        self._lock = threading.Lock()
        self._index: OrderedDict[str, int] = OrderedDict()  # file name -> bytes, LRU first
        self._used = 0
        self._counters = dict(stored=0, dropped=0, hits=0, misses=0, corrupt=0, evicted=0, errors=0)
        self._warn = RateLimitedLog(log, f"disk tier {self.root}: ")
        self._scan()
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
        """The verified payload of ``key`` (CPU uint8), or None on a miss or a bad file."""
        name = self._file_name(key)
        path = self._path(name)
        with self._lock:
            if name not in self._index:
                self._counters["misses"] += 1
                return None
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            with self._lock:
                self._forget(name)
                self._counters["misses"] += 1
            return None
        payload, reason = chunk_codec.decode(blob, key, fingerprint, nbytes)
        with self._lock:
            if payload is None:
                self._counters["corrupt"] += 1
                self._forget(name)
            else:
                self._counters["hits"] += 1
                if name in self._index:
                    self._index.move_to_end(name)
        if payload is None:
            log.warning("disk tier: dropping bad file %s for %s: %s", path, key, reason)
            path.unlink(missing_ok=True)
            return None
        return payload.clone()  # own the memory, not the blob

    def load_many(self, keys: list[str], fingerprint: str, nbytes: int) -> list[torch.Tensor | None]:
        return [self.load(k, fingerprint, nbytes) for k in keys]

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every chunk submitted before the call is written or dropped; False on
        timeout (also when the queue is full)."""
        return self._writer.flush(timeout_s)

    def stats(self) -> dict:
        """Counters (stored, dropped, hits, misses, corrupt, evicted, errors), ``files``,
        ``used_bytes``, ``capacity_bytes``, ``queue_depth``, ``queued_bytes``."""
        writer = self._writer.stats()
        with self._lock:
            out = dict(self._counters, files=len(self._index), used_bytes=self._used,
                       capacity_bytes=self.capacity_bytes)
        out["errors"] += writer["errors"]
        out.update(queue_depth=writer["queued"], queued_bytes=writer["queued_bytes"])
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
        found = []
        for path in self.root.glob(f"*/*{_SUFFIX}"):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            found.append((st.st_mtime, path.name, st.st_size))
        for path in self.root.glob("*/*.tmp"):
            path.unlink(missing_ok=True)  # an interrupted write
        for _, name, size in sorted(found):
            self._index[name] = size
            self._used += size
        if found:
            log.info("disk tier %s: found %d chunk files (%d bytes)", self.root, len(found), self._used)

    def _forget(self, name: str) -> None:
        size = self._index.pop(name, None)
        if size is not None:
            self._used -= size

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
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f"{name}.{threading.get_ident()}.tmp")
        with open(tmp, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)
        victims = []
        with self._lock:
            self._index[name] = len(blob)
            self._used += len(blob)
            self._counters["stored"] += 1
            while self.capacity_bytes is not None and self._used > self.capacity_bytes:
                victim, _ = next(iter(self._index.items()))
                self._forget(victim)
                self._counters["evicted"] += 1
                victims.append(victim)
        for victim in victims:
            self._path(victim).unlink(missing_ok=True)
