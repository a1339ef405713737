"""The L1 manager: the public API of one L1 (device slabs, owned and leased reader shares, copy
pins, eviction), over the object pool that keeps its books (:mod:`~gpukv.l1.pool`).

States: absent -> writing (invisible to readers) -> ready <-> read-locked(n) -> absent, and from
any state *doomed* (discarded while a copy still pins it: invisible, its slot freed by the last
unpin). An owner holds at most ``MAX_READERS`` shares of one key and releases only its own; a
copy's pin keeps its slot from being freed or handed out; an expired write never becomes
readable; a temporary object (a tier hit) goes with its last share and pin; eviction takes only
idle objects of the device that needs room. Keys are global, capacity and eviction per device.

This class validates arguments, takes the one lock (once per call), reads the clock, and hands
each call to the structure that owns its rule, in one pass over the keys.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Hashable, Iterable, Sequence

import torch

from gpukv.constants import MAX_READERS
from gpukv.l1.entry import Entry, Status, share_count
from gpukv.l1.pool import ObjectPool
from gpukv.l1.slab import SlabArena

OK = Status.OK
__all__ = ["Entry", "L1Manager", "MAX_READERS", "Status"]


class L1Manager:
    """Device-resident chunk cache with owned, leased reader shares and copy pins."""

    def __init__(self, capacity_bytes: int | None = None, *, device: torch.device | str = "cpu",
                 arenas: Sequence[SlabArena] | None = None, read_lease_s: float = 300.0,
                 write_lease_s: float = 600.0, clock: Callable[[], float] = time.monotonic,
                 slab_bytes: int | None = None,
                 on_event: Callable[[str, Entry, str], None] | None = None) -> None:
        """One ``capacity_bytes`` arena on ``device``, or the given ``arenas`` (one per device).

        ``on_event(event, entry, reason)``: "stored" when an object becomes readable (reason
        "new", or "loaded" for a temporary tier hit), "removed" when a readable one goes
        ("evicted", "cleared", "deleted", "released": a temporary object's last reader left).
        It runs under the manager's lock: it must be quick and must not call the manager."""
        for name, value in (("read_lease_s", read_lease_s), ("write_lease_s", write_lease_s)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if arenas is None:
            arenas = [SlabArena(capacity_bytes, device=device, slab_bytes=slab_bytes)]
        elif capacity_bytes is not None or not arenas:
            raise ValueError("give either capacity_bytes or a non-empty list of arenas")
        self.read_lease_s, self.write_lease_s, self._clock = read_lease_s, write_lease_s, clock
        self._lock = threading.Lock()
        pool = self._pool = ObjectPool(arenas, on_event)
        self.arenas = pool.arenas
        self._objects, self._writes, self._holds = pool.objects, pool.writes, pool.holds

    # -- writes --------------------------------------------------------------------------------
    def reserve_write(self, keys: Iterable[Hashable], nbytes: int, *, device: int = 0,
                      temporary: bool = False, owner: Hashable = None) -> list[Status]:
        """Start writing ``nbytes`` per absent key (OK); existing keys get NOT_WRITABLE. Evicts
        when full; once a key gets OUT_OF_MEMORY, so do all later keys. Each write is pinned
        until ``finish_write``/``abort_write``."""
        return self.reserve_write_slots(keys, nbytes, device=device, temporary=temporary,
                                        owner=owner)[0]

    def reserve_write_slots(self, keys: Iterable[Hashable], nbytes: int, *, device: int = 0,
                            temporary: bool = False, owner: Hashable = None
                            ) -> tuple[list[Status], list[Entry | None]]:
        """``reserve_write`` that also returns the handle of each new write (None where not OK):
        what a copy needs (``handle.device``, ``handle.offset``) and gives back at the end."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
            raise ValueError(f"nbytes must be a positive int, got {nbytes!r}")
        if isinstance(device, bool) or not isinstance(device, int) or not 0 <= device < len(self.arenas):
            raise ValueError(f"device must be an arena index in [0, {len(self.arenas)}), got {device!r}")
        slot_bytes = self.arenas[device].slot_bytes_for(nbytes)
        with self._lock:
            return self._pool.reserve_writes(keys, device, nbytes, slot_bytes, temporary, owner,
                                             self._clock() + self.write_lease_s)

    def finish_write(self, writes: Iterable, *, owner: Hashable = None, extra_count: int | None = None,
                     reader: Hashable = None) -> list[Status]:
        """Make written objects ready and release their write pins. ``writes``: keys (``owner``'s
        writes of them) or handles from ``reserve_write_slots``. With ``extra_count``, ``reader``
        also gets ``1 + extra_count`` shares in the same step (no eviction can slip in).
        NOT_FOUND: absent, or discarded meanwhile (expired, aborted, its owner released);
        WRONG_STATE: ready, or another owner's write."""
        count = None if extra_count is None else share_count(extra_count)
        out: list[Status] = []
        with self._lock:
            self._pool.finish_writes(self._writes.resolve(writes, owner, self._objects.get, out),
                                     reader, count, self._clock() + self.read_lease_s)
        return out

    def finish_write_and_reserve_read(self, keys: Iterable, extra_count: int = 0, *,
                                      owner: Hashable = None) -> list[Status]:
        """``finish_write`` plus ``1 + extra_count`` shares for ``owner`` in one step per key."""
        return self.finish_write(keys, owner=owner, extra_count=extra_count, reader=owner)

    def abort_write(self, writes: Iterable, *, owner: Hashable = None) -> list[Status]:
        """Discard unfinished writes (keys of ``owner``, or handles) and release their pins."""
        out: list[Status] = []
        with self._lock:
            self._pool.abort_writes(self._writes.resolve(writes, owner, self._objects.get, out))
        return out

    # -- shares --------------------------------------------------------------------------------
    def reserve_read(self, keys: Iterable[Hashable], extra_count: int = 0, *,
                     owner: Hashable = None, top_up: bool = False) -> list[Status]:
        """Give ``owner`` ``1 + extra_count`` shares per ready key (and refresh its lease); with
        ``top_up`` only what brings ``owner`` up to that many. NOT_FOUND if absent, NOT_READY
        while written, WRONG_STATE past MAX_READERS for the owner (nothing taken for that key)."""
        count = extra_count + 1 if type(extra_count) is int and 0 <= extra_count < MAX_READERS \
            else share_count(extra_count)  # (the common case inline: once per call)
        with self._lock:
            return self._holds.take(keys, self._objects, owner, count,
                                    self._clock() + self.read_lease_s, top_up)

    def reserve_prefix(self, key_lists: Sequence[Sequence[Hashable]], extra_count: int = 0, *,
                       owner: Hashable = None) -> int:
        """The lookup's L1 step under one lock: ``n``, the number of leading keys ready in every
        list of ``key_lists`` (one list per rank's key space), then ``owner``'s shares on the
        first ``n`` keys of each list topped up to ``1 + extra_count`` (as ``reserve_read(...,
        top_up=True)``, which cannot fail for them) and its leases refreshed. Returns ``n``;
        nothing is taken when it is 0. Nothing can be evicted between the count and the shares."""
        count = extra_count + 1 if type(extra_count) is int and 0 <= extra_count < MAX_READERS \
            else share_count(extra_count)  # (the common case inline: once per call)
        with self._lock:
            rows = self._objects.ready_prefix(key_lists)
            if rows:
                self._holds.top_up(rows, owner, count, self._clock() + self.read_lease_s)
        return len(rows[0]) if rows else 0

    def finish_read(self, keys: Iterable[Hashable], extra_count: int = 0, *,
                    owner: Hashable = None) -> list[Status]:
        """Release ``1 + extra_count`` of ``owner``'s shares per key; WRONG_STATE (no change) if
        the owner holds fewer. A temporary object whose count reaches zero is freed."""
        count = extra_count + 1 if type(extra_count) is int and 0 <= extra_count < MAX_READERS \
            else share_count(extra_count)  # (the common case inline: once per call)
        with self._lock:
            out, settle = self._holds.release(keys, self._objects.get, owner, count)
            if settle:
                self._pool.settle(settle)
        return out

    # -- pins ----------------------------------------------------------------------------------
    def pin(self, keys: Iterable[Hashable]) -> tuple[list[Status], list[Entry | None]]:
        """Pin ready objects for a copy out of them; NOT_FOUND / NOT_READY as ``reserve_read``."""
        with self._lock:
            return self._holds.pin(keys, self._objects)

    def pin_handles(self, handles: Iterable[Entry]) -> list[Status]:
        """Pin objects already named by handles (NOT_FOUND once discarded, NOT_READY if writing)."""
        with self._lock:
            return self._holds.pin_handles(handles)

    def unpin(self, handles: Iterable[Entry]) -> None:
        """Release pins taken by ``pin``/``pin_handles`` (the last one frees a discarded object)."""
        with self._lock:
            self._pool.settle(self._holds.unpin(handles)[1])

    def end_read(self, handles: Iterable[Entry], *, owner: Hashable = None) -> int:
        """After a copy out of pinned objects: release one of ``owner``'s shares of each (where
        it still holds one), then unpin. Returns the shares released."""
        with self._lock:
            released, settle = self._holds.unpin(handles, owner, one_share=True)
            if settle:
                self._pool.settle(settle)
        return released

    # -- leases, owners, delete ----------------------------------------------------------------
    def expire(self) -> int:
        """Release every share whose lease has passed and discard every write whose lease has
        passed (pinned slots are freed by their last unpin). Returns the shares released."""
        with self._lock:
            return self._pool.expire(self._clock())

    def release_owner(self, owner: Hashable, keys: Iterable[Hashable] | None = None) -> int:
        """Drop all shares ``owner`` holds (on ``keys`` only, when given) and, without ``keys``,
        discard its unfinished writes. Returns the shares released."""
        with self._lock:
            return self._pool.release_owner(owner, keys)

    def delete(self, keys: Iterable[Hashable], *, force: bool = False) -> list[Status]:
        """Free objects. Read-locked, pinned or unfinished ones get LOCKED unless ``force``
        (they are then discarded: shares dropped, slot freed by the last unpin)."""
        with self._lock:
            return self._pool.delete(keys, force)

    def clear(self) -> int:
        """Delete every ready, unlocked, unpinned object; returns how many were deleted."""
        with self._lock:
            return self._pool.clear()

    # -- views ---------------------------------------------------------------------------------
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
            entry = self._objects.entry(key)
            if entry.idle:
                raise ValueError(f"L1 object {key!r} is not being written, read-locked or pinned")
            return self.arenas[entry.device].arena[entry.offset:entry.offset + entry.nbytes]

    def locate(self, keys: Iterable[Hashable]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(arena, offsets)`` of objects in one arena: its 1-D uint8 memory and a CPU int64
        tensor of byte offsets, one per key. KeyError naming the first absent key; ValueError if
        the keys live in several arenas."""
        with self._lock:
            entries = [self._objects.entry(key) for key in keys]
        devices = {e.device for e in entries} or {0}
        if len(devices) > 1:
            raise ValueError(f"keys live in arenas {sorted(devices)}: locate one arena at a time")
        return self.arenas[devices.pop()].arena, torch.tensor([e.offset for e in entries],
                                                              dtype=torch.int64)

    def nbytes(self, key: Hashable) -> int:
        """Byte size of a live object (writing or ready); KeyError naming an absent key."""
        with self._lock:
            return self._objects.entry(key).nbytes

    def device_of(self, key: Hashable) -> int:
        """Arena index of a live object; KeyError naming an absent key."""
        with self._lock:
            return self._objects.entry(key).device

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
        with self._lock:
            return self._objects.leading_ready(keys)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return self._objects.is_ready(key)

    def __len__(self) -> int:
        return self._objects.num_ready

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
            return self._pool.stats()
