"""The engine: chunk keys, the books of a cache (requests, shares, tiers), the spill and load
paths, and the embedded :class:`CacheEngine` a worker imports."""

from gpukv.engine.engine import CacheEngine

__all__ = ["CacheEngine"]
