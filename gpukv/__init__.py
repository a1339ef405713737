"""gpukv: a GPU-first KV-cache layer for LLM inference workers.

Public API (imported lazily so `import gpukv` stays light for CLI start-up):
    PagedKV, pack, unpack                 describe paged KV caches and copy chunks
    L1Manager, Status, MAX_READERS         the device slab with reader refcounts
    chunk_hashes                           stable chained chunk keys
    CacheEngine, EngineConfig              the embedded engine
    CacheClient                            the same API through a `gpukv serve` process
    ServerProcess                          a `gpukv serve` child process (demos, tests)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "PagedKV": "gpukv.paged.layout",
    "pack": "gpukv.paged.copy",
    "unpack": "gpukv.paged.copy",
    "L1Manager": "gpukv.l1",
    "Status": "gpukv.l1",
    "MAX_READERS": "gpukv.l1",
    "chunk_hashes": "gpukv.engine.keys",
    "CacheEngine": "gpukv.engine",
    "EngineConfig": "gpukv.config",
    "CacheClient": "gpukv.frontend.client",
    "ServerProcess": "gpukv.frontend.process",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gpukv' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
