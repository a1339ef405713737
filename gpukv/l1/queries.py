"""Read-only views of the L1 manager's state: lookups by key, arena views, counters.

A mixin of :class:`gpukv.l1.manager.L1Manager` (kept apart so that the state changes read on
their own); every method takes the manager's lock once. Absent keys raise ``KeyError`` naming
the key where a value is required.
"""

from __future__ import annotations

from typing import Hashable, Iterable

import torch


class L1Queries:
    """Queries over ``_objects`` (live objects by key), ``_writing``, ``arenas`` and counters."""

    def arena(self, device: int = 0) -> torch.Tensor:
        """The 1-D uint8 memory of one device's arena (what the copy kernels take)."""
        return self.arenas[device].arena

    @property
    def num_devices(self) -> int:
        return len(self.arenas)

    def buffer(self, key: Hashable) -> torch.Tensor:
        """1-D uint8 view of ``nbytes`` of an object being written, read-locked or pinned.
        KeyError if absent; ValueError if ready and idle (take a share or a pin first)."""
        with self._lock:
            entry = self._entry(key)
            if entry.idle:
                raise ValueError(f"L1 object {key!r} is not being written, read-locked or pinned")
            return self.arenas[entry.device].arena[entry.offset:entry.offset + entry.nbytes]

    def locate(self, keys: Iterable[Hashable]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(arena, offsets)`` of objects in one arena: its 1-D uint8 memory and a CPU int64
        tensor of byte offsets, one per key. KeyError naming the first absent key; ValueError if
        the keys live in several arenas."""
        with self._lock:
            entries = [self._entry(key) for key in keys]
        devices = {e.device for e in entries} or {0}
        if len(devices) > 1:
            raise ValueError(f"keys live in arenas {sorted(devices)}: locate one arena at a time")
        return self.arenas[devices.pop()].arena, torch.tensor([e.offset for e in entries],
                                                              dtype=torch.int64)

    def nbytes(self, key: Hashable) -> int:
        """Byte size of a live object (writing or ready); KeyError naming an absent key."""
        with self._lock:
            return self._entry(key).nbytes

    def device_of(self, key: Hashable) -> int:
        """Arena index of a live object; KeyError naming an absent key."""
        with self._lock:
            return self._entry(key).device

    def read_count(self, key: Hashable) -> int:
        """Total shares held on ``key`` by all owners (0 if absent)."""
        with self._lock:
            entry = self._objects.get(key)
            return entry.readers if entry is not None else 0

    def pin_count(self, key: Hashable) -> int:
        """Copies pinning the live object ``key`` (0 if absent)."""
        with self._lock:
            entry = self._objects.get(key)
            return entry.pins if entry is not None else 0

    def held(self, key: Hashable, owner: Hashable = None) -> int:
        """Shares ``owner`` holds on ``key`` (0 if none or absent)."""
        with self._lock:
            entry = self._objects.get(key)
            return entry.shares.get(owner, 0) if entry is not None else 0

    def is_evictable(self, key: Hashable) -> bool:
        """Whether ``key`` is ready, unlocked and unpinned (False if absent)."""
        with self._lock:
            entry = self._objects.get(key)
            return entry is not None and entry.idle

    def prefix_hits(self, keys: Iterable[Hashable]) -> int:
        """Number of leading keys that are ready (read-locked or not). Does not touch recency."""
        hits = 0
        with self._lock:
            get = self._objects.get
            for key in keys:
                entry = get(key)
                if entry is None or not entry.ready:
                    break
                hits += 1
        return hits

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            entry = self._objects.get(key)
            return entry is not None and entry.ready

    def __len__(self) -> int:
        return len(self._objects) - len(self._writing)

    @property
    def used_bytes(self) -> int:
        """Bytes of the slots held in all arenas (live objects and discarded, still pinned ones)."""
        return sum(a.used_bytes for a in self.arenas)

    @property
    def capacity_bytes(self) -> int:
        return sum(a.capacity_bytes for a in self.arenas)

    def stats(self) -> dict:
        """Counters: objects, ready, writing, read_locked, pinned, shares, used_bytes,
        capacity_bytes, evictions, expired_shares, expired_writes, deferred_frees, slabs_in_use,
        leases, owners, and ``devices``: per arena used/capacity bytes, objects, read_locked,
        shares and evictions."""
        with self._lock:
            entries = list(self._objects.values())
            writing = len(self._writing)
            per_device = [dict(used_bytes=a.used_bytes, capacity_bytes=a.capacity_bytes,
                               objects=0, read_locked=0, shares=0,
                               evictions=self._counts["evictions"][i])
                          for i, a in enumerate(self.arenas)]
            for entry in entries:
                dev = per_device[entry.device]
                dev["objects"] += 1
                if entry.shares:
                    dev["read_locked"] += 1
                    dev["shares"] += entry.readers
            return {
                "objects": len(entries),
                "ready": len(entries) - writing,
                "writing": writing,
                "read_locked": sum(1 for e in entries if e.shares),
                "pinned": sum(1 for e in entries if e.pins and e.ready),
                "shares": sum(e.readers for e in entries),
                "used_bytes": self.used_bytes,
                "capacity_bytes": self.capacity_bytes,
                "evictions": sum(self._counts["evictions"]),
                "expired_shares": self._counts["expired_shares"],
                "expired_writes": self._counts["expired_writes"],
                "deferred_frees": self._counts["deferred_frees"],
                "slabs_in_use": sum(a.num_slabs for a in self.arenas),
                "leases": self._owner_leases.num_leases(),
                "owners": len(self._owner_leases),
                "devices": per_device,
            }

    def _entry(self, key: Hashable):
        entry = self._objects.get(key)
        if entry is None:
            raise KeyError(f"no L1 object for key {key!r}")
        return entry
