"""The L1 manager: objects in the device slab, owned reader shares with leases, LRU eviction.

States: absent -> writing (invisible to readers) -> ready <-> read-locked(n) -> absent.

- Shares: ``reserve_read(keys, extra_count)`` gives ``owner`` ``1 + extra_count`` shares per key
  in one step; each object keeps ``shares: owner -> count``, one integer per (key, owner)
  whatever the count, so taking or releasing n shares is O(1) in n. An owner holds at most
  ``MAX_READERS`` shares of one key and can only release its own.
- Leases: a share lease lasts ``read_lease_s`` from the owner's latest reserve on that key; a
  write lease lasts ``write_lease_s`` from ``reserve_write``. Deadlines are enforced only by
  ``expire()``, in O(owners holding shares + expired leases) (``gpukv.l1.leases``).
- Temporary objects (L2 hits) are freed when their read count drops to zero, whether by
  ``finish_read``, ``expire()``, ``release_owner()`` or ``delete(force=True)``. A temporary object
  finished with plain ``finish_write`` (no readers) stays ready until evicted or deleted.
- Eviction (only in ``reserve_write`` when the slab is full) takes ready, unlocked objects only:
  the LRU object of the same size class, else a whole slab of another class (``gpukv.l1.eviction``).
- Keys in one ``reserve_write`` are served in order, so a ready key of the batch that an earlier
  key evicted is then written afresh (OK), or gets OUT_OF_MEMORY, instead of NOT_WRITABLE.
- ``buffer(key)`` only for objects being written or read-locked (a ready, unlocked one could be
  evicted under the caller); ``locate``/``nbytes`` for any existing object. Absent keys raise
  ``KeyError`` naming the key.
- Thread safety: one lock around all state, taken once per call.
"""

from __future__ import annotations

import enum
import numbers
import operator
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterable

import torch

from gpukv.l1.eviction import SizeClassLRU
from gpukv.l1.leases import LeaseIndex
from gpukv.l1.slab import SlabArena, aligned_bytes

from gpukv.constants import MAX_READERS  # noqa: E402  (re-exported)


class Status(enum.Enum):
    """Per-key outcome of an L1 call."""

    OK = "OK"
    NOT_FOUND = "NOT_FOUND"
    NOT_READY = "NOT_READY"
    NOT_WRITABLE = "NOT_WRITABLE"
    WRONG_STATE = "WRONG_STATE"
    LOCKED = "LOCKED"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"


OK, NOT_FOUND, NOT_READY, WRONG_STATE = Status.OK, Status.NOT_FOUND, Status.NOT_READY, Status.WRONG_STATE


@dataclass(slots=True, eq=False)
class _Object:
    key: Hashable
    nbytes: int
    slot_bytes: int
    offset: int
    temporary: bool
    writer: Hashable  # owner of the unfinished write
    write_deadline: float
    ready: bool = False
    readers: int = 0  # sum of the counts in ``shares``
    stamp: int = 0  # LRU recency (larger = more recent)
    shares: dict[Hashable, int] = field(default_factory=dict)  # owner -> count


def _check_extra(extra_count: int) -> int:
    extra = operator.index(extra_count)
    if not 0 <= extra < MAX_READERS:
        raise ValueError(f"extra_count must be in [0, {MAX_READERS - 1}], got {extra_count!r}")
    return extra + 1


class L1Manager:
    """Device-resident chunk cache with owned, leased reader shares (see the module docstring)."""

    def __init__(self, capacity_bytes: int, *, device: torch.device | str = "cpu",
                 read_lease_s: float = 300.0, write_lease_s: float = 600.0,
                 clock: Callable[[], float] = time.monotonic, slab_bytes: int | None = None) -> None:
        """Allocate a ``capacity_bytes`` uint8 arena on ``device`` ("cpu", "cuda", "cuda:N")."""
        for name, value in (("read_lease_s", read_lease_s), ("write_lease_s", write_lease_s)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        self._slab = SlabArena(capacity_bytes, device=device, slab_bytes=slab_bytes)
        self.read_lease_s, self.write_lease_s, self._clock = read_lease_s, write_lease_s, clock
        self._lock = threading.Lock()
        self._objects: dict[Hashable, _Object] = {}
        self._evictable: SizeClassLRU[_Object] = SizeClassLRU(self._slab)
        self._writing: OrderedDict[Hashable, _Object] = OrderedDict()  # by write deadline
        self._owner_leases = LeaseIndex()
        self._owner_writes: dict[Hashable, dict[Hashable, None]] = {}
        self._evictions = 0

    # -- writes --------------------------------------------------------------------------------
    def reserve_write(self, keys: Iterable[Hashable], nbytes: int, *, temporary: bool = False,
                      owner: Hashable = None) -> list[Status]:
        """Start writing ``nbytes`` per absent key (OK); existing keys get NOT_WRITABLE. Evicts
        when full; once a key gets OUT_OF_MEMORY, so do all later keys."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, numbers.Integral) or nbytes <= 0:
            raise ValueError(f"nbytes must be a positive int, got {nbytes!r}")
        nbytes = int(nbytes)
        slot_bytes = aligned_bytes(nbytes)
        out: list[Status] = []
        with self._lock:
            self._evictable.add_class(slot_bytes)
            deadline = self._clock() + self.write_lease_s
            objects, full = self._objects, slot_bytes > self._slab.capacity_bytes
            writes = self._owner_writes.setdefault(owner, {})
            for key in keys:
                if full:
                    out.append(Status.OUT_OF_MEMORY)
                elif key in objects:
                    out.append(Status.NOT_WRITABLE)
                else:
                    offset = self._alloc(slot_bytes)
                    if offset is None:
                        full = True
                        out.append(Status.OUT_OF_MEMORY)
                        continue
                    obj = _Object(key, nbytes, slot_bytes, offset, temporary, owner, deadline)
                    objects[key] = self._writing[key] = obj
                    writes[key] = None
                    out.append(OK)
            if not writes:
                del self._owner_writes[owner]
        return out

    def finish_write(self, keys: Iterable[Hashable], *, owner: Hashable = None) -> list[Status]:
        """Make ``owner``'s written objects ready (they join the LRU as most recent).
        NOT_FOUND if absent; WRONG_STATE if ready or written by another owner."""
        out: list[Status] = []
        with self._lock:
            for key in keys:
                obj = self._writing_obj(key, owner, out)
                if obj is not None:
                    self._make_ready(obj)
                    self._evictable.push(obj)
        return out

    def finish_write_and_reserve_read(self, keys: Iterable[Hashable], extra_count: int = 0, *,
                                      owner: Hashable = None) -> list[Status]:
        """``finish_write`` plus ``1 + extra_count`` shares for ``owner`` in one step per key, so
        no eviction can come between. Statuses as ``finish_write``."""
        count = _check_extra(extra_count)
        out: list[Status] = []
        with self._lock:
            now = self._clock()
            for key in keys:
                obj = self._writing_obj(key, owner, out)
                if obj is not None:
                    self._make_ready(obj)
                    self._add_shares(obj, owner, count, now)
        return out

    def abort_write(self, keys: Iterable[Hashable], *, owner: Hashable = None) -> list[Status]:
        """Free ``owner``'s unfinished writes. Statuses as ``finish_write``."""
        out: list[Status] = []
        with self._lock:
            for key in keys:
                obj = self._writing_obj(key, owner, out)
                if obj is not None:
                    self._free(obj)
        return out

    def _writing_obj(self, key: Hashable, owner: Hashable, out: list[Status]) -> _Object | None:
        obj = self._objects.get(key)
        if obj is None:
            out.append(NOT_FOUND)
        elif obj.ready or obj.writer != owner:
            out.append(WRONG_STATE)
        else:
            out.append(OK)
            return obj
        return None

    def _make_ready(self, obj: _Object) -> None:
        obj.ready = True
        del self._writing[obj.key]
        self._drop_owner_write(obj.writer, obj.key)

    # -- reads ---------------------------------------------------------------------------------
    def reserve_read(self, keys: Iterable[Hashable], extra_count: int = 0, *,
                     owner: Hashable = None) -> list[Status]:
        """Give ``owner`` ``1 + extra_count`` shares per ready key (and refresh its lease).
        NOT_FOUND if absent, NOT_READY while written, WRONG_STATE past MAX_READERS for the owner."""
        count = _check_extra(extra_count)
        out: list[Status] = []
        with self._lock:
            get, lrus, leases = self._objects.get, self._evictable.by_class, self._owner_leases
            deadline = self._clock() + self.read_lease_s
            owned = leases.owned(owner)
            for key in keys:  # _add_shares and leases.refresh inlined: the lookup hot path
                obj = get(key)
                if obj is None:
                    out.append(NOT_FOUND)
                    continue
                if not obj.ready:
                    out.append(NOT_READY)
                    continue
                shares = obj.shares
                held = shares.get(owner)
                if held is None:
                    shares[owner] = count
                    owned[key] = deadline
                elif held + count > MAX_READERS:
                    out.append(WRONG_STATE)
                    continue
                else:
                    shares[owner] = held + count
                    owned[key] = deadline
                    owned.move_to_end(key)
                if not obj.readers:
                    del lrus[obj.slot_bytes][key]
                obj.readers += count
                out.append(OK)
            leases.forget_if_idle(owner)
        return out

    def finish_read(self, keys: Iterable[Hashable], extra_count: int = 0, *,
                    owner: Hashable = None) -> list[Status]:
        """Release ``1 + extra_count`` of ``owner``'s shares per key; WRONG_STATE (no change) if
        the owner holds fewer. A temporary object whose count reaches zero is freed."""
        count = _check_extra(extra_count)
        out: list[Status] = []
        with self._lock:
            get, leases, evictable = self._objects.get, self._owner_leases, self._evictable
            owned, lrus, stamp = leases.get(owner), evictable.by_class, evictable.stamp
            for key in keys:
                obj = get(key)
                if obj is None:
                    out.append(NOT_FOUND)
                    continue
                shares = obj.shares
                held = shares.get(owner)
                if held is None or held < count:
                    out.append(WRONG_STATE)
                    continue
                if held == count:
                    del shares[owner]
                    del owned[key]
                else:
                    shares[owner] = held - count
                obj.readers -= count
                if not obj.readers:
                    if obj.temporary:
                        self._free(obj)
                    else:  # evictable.push inlined
                        stamp += 1
                        obj.stamp = stamp
                        lrus[obj.slot_bytes][key] = obj
                out.append(OK)
            evictable.stamp = stamp
            leases.forget_if_idle(owner)
        return out

    def _add_shares(self, obj: _Object, owner: Hashable, count: int, now: float) -> None:
        """First shares of an object just made ready (never in the LRU, so never evictable)."""
        assert count <= MAX_READERS and not obj.shares and not obj.readers
        obj.shares[owner] = count
        self._owner_leases.refresh(owner, obj.key, now + self.read_lease_s)
        obj.readers = count

    # -- leases and owners ---------------------------------------------------------------------
    def expire(self) -> int:
        """Release every share whose lease has passed and discard every write whose lease has
        passed. Returns the number of shares released. O(owners with shares + expired leases):
        each owner's leases are kept in deadline order (one lease duration, monotonic clock)."""
        with self._lock:
            now, released = self._clock(), 0
            for owner, key in self._owner_leases.pop_expired(now):
                released += self._release_shares(key, owner)
            while self._writing:
                obj = next(iter(self._writing.values()))
                if obj.write_deadline > now:
                    break
                self._free(obj)
            return released

    def release_owner(self, owner: Hashable) -> int:
        """Drop every share and unfinished write of ``owner``; returns the shares released."""
        with self._lock:
            released = 0
            for key in self._owner_leases.pop_owner(owner):
                released += self._release_shares(key, owner)
            for key in list(self._owner_writes.get(owner, ())):
                self._free(self._objects[key])
            return released

    def held(self, key: Hashable, owner: Hashable = None) -> int:
        """Shares ``owner`` holds on ``key`` (0 if none or absent)."""
        with self._lock:
            obj = self._objects.get(key)
            return obj.shares.get(owner, 0) if obj is not None else 0

    def _release_shares(self, key: Hashable, owner: Hashable) -> int:
        """Drop all of ``owner``'s shares of ``key``; the caller has removed the lease."""
        obj = self._objects[key]
        count = obj.shares.pop(owner)
        obj.readers -= count
        assert obj.readers >= 0, (obj.key, obj.readers)
        if not obj.readers:
            self._unlocked(obj)
        return count

    # -- delete, eviction, freeing -------------------------------------------------------------
    def delete(self, keys: Iterable[Hashable], *, force: bool = False) -> list[Status]:
        """Free objects. Read-locked or unfinished ones get LOCKED unless ``force`` (their shares
        and unfinished writes are then dropped too)."""
        out: list[Status] = []
        with self._lock:
            for key in keys:
                obj = self._objects.get(key)
                if obj is None:
                    out.append(NOT_FOUND)
                    continue
                if obj.ready and not obj.readers:
                    self._evictable.remove(obj)
                elif not force:
                    out.append(Status.LOCKED)
                    continue
                for owner in obj.shares:
                    self._owner_leases.drop(owner, key)
                obj.shares.clear()
                obj.readers = 0
                self._free(obj)
                out.append(OK)
        return out

    def clear(self) -> int:
        """Delete every ready, unlocked object; returns how many were deleted."""
        with self._lock:
            victims = self._evictable.pop_all()
            for obj in victims:
                self._free(obj)
            return len(victims)

    def _unlocked(self, obj: _Object) -> None:
        if obj.temporary:
            self._free(obj)
        else:
            self._evictable.push(obj)

    def _free(self, obj: _Object) -> None:
        """Forget ``obj`` and free its slot; the caller has taken it out of the LRU if it was there."""
        assert obj.readers == 0 and not obj.shares, obj.key
        del self._objects[obj.key]
        if not obj.ready:
            del self._writing[obj.key]
            self._drop_owner_write(obj.writer, obj.key)
        self._slab.free(obj.offset)

    def _drop_owner_write(self, owner: Hashable, key: Hashable) -> None:
        writes = self._owner_writes[owner]
        del writes[key]
        if not writes:
            del self._owner_writes[owner]

    def _alloc(self, slot_bytes: int) -> int | None:
        offset = self._slab.alloc(slot_bytes)
        while offset is None:
            victims = self._evictable.victims(slot_bytes)
            if not victims:
                break
            self._evictions += len(victims)
            for obj in victims:
                self._free(obj)
            offset = self._slab.alloc(slot_bytes)
        return offset

    # -- queries -------------------------------------------------------------------------------
    def buffer(self, key: Hashable) -> torch.Tensor:
        """1-D uint8 view of ``nbytes`` into the arena for an object being written or read-locked.
        KeyError if absent; ValueError if ready but unlocked (take a read share first)."""
        with self._lock:
            obj = self._objects.get(key)
            if obj is None:
                raise KeyError(f"no L1 object for key {key!r}")
            if obj.ready and not obj.readers:
                raise ValueError(f"L1 object {key!r} is not being written nor read-locked")
            return self._slab.arena[obj.offset:obj.offset + obj.nbytes]

    def locate(self, keys: Iterable[Hashable]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(arena, offsets)``: the 1-D uint8 arena and a CPU int64 tensor of byte offsets, one
        per key (writing, ready or read-locked). KeyError naming the first absent key."""
        with self._lock:
            objects, offsets = self._objects, []
            for key in keys:
                obj = objects.get(key)
                if obj is None:
                    raise KeyError(f"no L1 object for key {key!r}")
                offsets.append(obj.offset)
        return self._slab.arena, torch.tensor(offsets, dtype=torch.int64)

    def nbytes(self, key: Hashable) -> int:
        """Byte size of an existing object (writing or ready); KeyError naming an absent key."""
        with self._lock:
            obj = self._objects.get(key)
            if obj is None:
                raise KeyError(f"no L1 object for key {key!r}")
            return obj.nbytes

    def read_count(self, key: Hashable) -> int:
        """Total shares held on ``key`` by all owners (0 if absent)."""
        with self._lock:
            obj = self._objects.get(key)
            return obj.readers if obj is not None else 0

    def is_evictable(self, key: Hashable) -> bool:
        """Whether ``key`` is ready and unlocked (False if absent)."""
        with self._lock:
            obj = self._objects.get(key)
            return obj is not None and obj.ready and obj.readers == 0

    def prefix_hits(self, keys: Iterable[Hashable]) -> int:
        """Number of leading keys that are ready (read-locked or not). Does not touch recency."""
        hits = 0
        with self._lock:
            for key in keys:
                obj = self._objects.get(key)
                if obj is None or not obj.ready:
                    break
                hits += 1
        return hits

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            obj = self._objects.get(key)
            return obj is not None and obj.ready

    def __len__(self) -> int:
        return len(self._objects) - len(self._writing)

    @property
    def used_bytes(self) -> int:
        """Bytes of the slots held by live objects (writing or ready)."""
        return self._slab.used_bytes

    @property
    def capacity_bytes(self) -> int:
        return self._slab.capacity_bytes

    def stats(self) -> dict[str, int]:
        """Counters: objects, ready, writing, read_locked, used_bytes, capacity_bytes, evictions,
        slabs_in_use, leases, owners."""
        with self._lock:
            writing = len(self._writing)
            return {
                "objects": len(self._objects),
                "ready": len(self._objects) - writing,
                "writing": writing,
                "read_locked": sum(1 for obj in self._objects.values() if obj.readers),
                "used_bytes": self._slab.used_bytes,
                "capacity_bytes": self._slab.capacity_bytes,
                "evictions": self._evictions,
                "slabs_in_use": self._slab.num_slabs,
                "leases": self._owner_leases.num_leases(),
                "owners": len(self._owner_leases),
            }
