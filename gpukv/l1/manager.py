"""The L1 manager: objects in device slabs, owned reader shares with leases, copy pins, eviction.

States: absent -> writing (invisible to readers) -> ready <-> read-locked(n) -> absent, and from
any state *doomed* (discarded while a copy still pins it: invisible, its slot freed by the last
unpin).

- Shares: ``reserve_read(keys, extra_count)`` gives ``owner`` ``1 + extra_count`` shares per key
  in one step (``top_up=True``: only as many as bring the owner to that count, so a repeated
  lookup takes nothing more); one integer per (key, owner) whatever the count. An owner holds at
  most ``MAX_READERS`` shares of one key and can only release its own.
- Pins: every copy holds a pin on the object it reads or writes for its whole duration. A write
  is pinned from ``reserve_write`` until ``finish_write``/``abort_write``; a reader pins with
  ``pin`` and ends with ``unpin`` or ``end_read``. Release by owner, lease expiry, ``delete`` and
  eviction never free or hand out a pinned slot: they doom the object and the last unpin frees it.
  A pinned object is never evicted.
- Leases: a share lease lasts ``read_lease_s`` from the owner's latest reserve of that key; a
  write lease ``write_lease_s`` from ``reserve_write``. ``expire()`` enforces both: an expired
  write is doomed (it never becomes readable; ``finish_write`` then answers NOT_FOUND).
- Temporary objects (tier hits) are freed as soon as no share and no pin holds them.
- Eviction (only when an arena is full): ready, unlocked, unpinned objects of the same device, the
  LRU of the same size class first, else a whole slab of another class (``gpukv.l1.eviction``).
- Devices: one slab arena per device; an object lives in the arena its write named. Keys are
  global: one key is in at most one arena. Capacity and eviction are per device.
- Thread safety: one lock around all state, taken once per call.

The read side (shares and pins, the hot paths) lives in :mod:`gpukv.l1.reads`, the read-only
views in :mod:`gpukv.l1.queries`; this module holds the state, the writes and the lifetime of
objects (leases, owners, discarding, freeing, eviction).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Callable, Hashable, Iterable, Iterator, Sequence

import torch

from gpukv.constants import MAX_READERS
from gpukv.l1.entry import Entry, Status, share_count
from gpukv.l1.eviction import SizeClassLRU
from gpukv.l1.leases import LeaseIndex
from gpukv.l1.queries import L1Queries
from gpukv.l1.reads import L1Reads
from gpukv.l1.slab import SlabArena

OK, NOT_FOUND, WRONG_STATE = Status.OK, Status.NOT_FOUND, Status.WRONG_STATE
__all__ = ["Entry", "L1Manager", "MAX_READERS", "Status"]


class L1Manager(L1Reads, L1Queries):
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
        self.arenas: list[SlabArena] = list(arenas)
        self._lrus: list[SizeClassLRU[Entry]] = [SizeClassLRU(a) for a in self.arenas]
        self._stamp = 0  # LRU recency, one counter for all devices
        self.read_lease_s, self.write_lease_s, self._clock = read_lease_s, write_lease_s, clock
        self._lock = threading.Lock()
        self._objects: dict[Hashable, Entry] = {}  # live (not doomed) objects by key
        self._writing: OrderedDict[Entry, None] = OrderedDict()  # live writes, by deadline
        self._owner_writes: dict[Hashable, dict[Entry, None]] = {}
        # discarded writes whose writer still holds the pin (its finish/abort releases it)
        self._doomed_writes: dict[tuple[Hashable, Hashable], list[Entry]] = {}
        self._owner_leases = LeaseIndex()
        self._counts = dict(evictions=[0] * len(self.arenas), expired_shares=0, expired_writes=0,
                            deferred_frees=0)
        self._on_event = on_event

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
        slab, lru = self.arenas[device], self._lrus[device]
        slot_bytes = slab.slot_bytes_for(nbytes)
        statuses: list[Status] = []
        handles: list[Entry | None] = []
        with self._lock:
            class_lru = lru.add_class(slot_bytes)
            deadline = self._clock() + self.write_lease_s
            objects, full = self._objects, slot_bytes > slab.capacity_bytes
            for key in keys:
                offset = None if full or key in objects else self._alloc(device, slot_bytes)
                if offset is None:
                    full = full or key not in objects
                    statuses.append(Status.OUT_OF_MEMORY if full else Status.NOT_WRITABLE)
                    handles.append(None)
                    continue
                entry = Entry(key, device, nbytes, slot_bytes, offset, temporary, owner, deadline,
                              pins=1, lru=class_lru)
                objects[key] = entry
                self._writing[entry] = None
                self._owner_writes.setdefault(owner, {})[entry] = None
                statuses.append(OK)
                handles.append(entry)
        return statuses, handles

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
            now = self._clock()
            for entry in self._writes_of(writes, owner, out):
                if not entry.doomed:
                    entry.ready = True
                    self._end_write(entry)
                    if self._on_event is not None:
                        self._on_event("stored", entry, "loaded" if entry.temporary else "new")
                    if count is not None:
                        self._add_shares(entry, reader, count, now)
                self._release_write_pin(entry)
        return out

    def finish_write_and_reserve_read(self, keys: Iterable, extra_count: int = 0, *,
                                      owner: Hashable = None) -> list[Status]:
        """``finish_write`` plus ``1 + extra_count`` shares for ``owner`` in one step per key."""
        return self.finish_write(keys, owner=owner, extra_count=extra_count, reader=owner)

    def abort_write(self, writes: Iterable, *, owner: Hashable = None) -> list[Status]:
        """Discard unfinished writes (keys of ``owner``, or handles) and release their pins."""
        out: list[Status] = []
        with self._lock:
            for entry in self._writes_of(writes, owner, out):
                self._doom(entry)
                self._release_write_pin(entry)
        return out

    def _writes_of(self, writes: Iterable, owner: Hashable, out: list[Status]) -> Iterator[Entry]:
        """The unfinished writes named by ``writes`` whose pin is still held, one at a time (an
        item is resolved after the previous one was handled); appends a status per item to
        ``out``: OK, NOT_FOUND for a write discarded meanwhile (its pin is released all the
        same; by key: ``owner``'s latest discarded write of it, even where the key is live
        again), WRONG_STATE / NOT_FOUND for anything else (nothing released)."""
        for item in writes:
            if type(item) is Entry:
                entry = item if not item.ready and item.pins == 1 else None
                status = WRONG_STATE if entry is None else NOT_FOUND if entry.doomed else OK
            else:
                entry = self._objects.get(item)
                if entry is not None and not entry.ready and entry.writer == owner:
                    status = OK
                else:  # owner's discarded write of that key, even if the key was stored again
                    doomed = self._doomed_writes.get((owner, item))
                    status = NOT_FOUND if doomed or entry is None else WRONG_STATE
                    entry = doomed[-1] if doomed else None
            out.append(status)
            if entry is not None:
                yield entry

    def _release_write_pin(self, entry: Entry) -> None:
        if entry.doomed:
            doomed = self._doomed_writes[(entry.writer, entry.key)]
            doomed.remove(entry)
            if not doomed:
                del self._doomed_writes[(entry.writer, entry.key)]
        self._unpin(entry)

    def _end_write(self, entry: Entry) -> None:
        del self._writing[entry]
        writes = self._owner_writes[entry.writer]
        del writes[entry]
        if not writes:
            del self._owner_writes[entry.writer]

    def _settle(self, entry: Entry) -> None:
        """An object just lost its last reader or pin: free it, or make it evictable."""
        if entry.pins or entry.shares:
            return
        if entry.doomed:
            self.arenas[entry.device].free(entry.offset)
        elif entry.ready and entry.temporary:
            self._doom(entry, "released")
        elif entry.ready:
            self._stamp += 1
            self._lrus[entry.device].touch(entry, self._stamp)

    # -- leases, owners, delete ----------------------------------------------------------------
    def expire(self) -> int:
        """Release every share whose lease has passed and discard every write whose lease has
        passed (pinned slots are freed by their last unpin). Returns the shares released."""
        with self._lock:
            now, released = self._clock(), 0
            for owner, entry in self._owner_leases.pop_expired(now):
                released += self._drop_shares(entry, owner, lease_gone=True)
            while self._writing:
                entry = next(iter(self._writing))
                if entry.write_deadline > now:
                    break
                self._doom(entry)
                self._counts["expired_writes"] += 1
            self._counts["expired_shares"] += released
            return released

    def release_owner(self, owner: Hashable, keys: Iterable[Hashable] | None = None) -> int:
        """Drop all shares ``owner`` holds (on ``keys`` only, when given) and, without ``keys``,
        discard its unfinished writes. Returns the shares released."""
        with self._lock:
            released = 0
            owned = self._owner_leases.get(owner, {})
            if keys is None:
                entries = list(owned)
            else:
                entries = [e for e in map(self._objects.get, dict.fromkeys(keys)) if e in owned]
            for entry in entries:
                released += self._drop_shares(entry, owner)
            if keys is None:
                for entry in list(self._owner_writes.get(owner, ())):
                    self._doom(entry)
            return released

    def delete(self, keys: Iterable[Hashable], *, force: bool = False) -> list[Status]:
        """Free objects. Read-locked, pinned or unfinished ones get LOCKED unless ``force``
        (they are then discarded: shares dropped, slot freed by the last unpin)."""
        out: list[Status] = []
        with self._lock:
            for key in keys:
                entry = self._objects.get(key)
                if entry is None:
                    out.append(NOT_FOUND)
                elif not (entry.idle or force):
                    out.append(Status.LOCKED)
                else:
                    self._doom(entry)
                    out.append(OK)
        return out

    def clear(self) -> int:
        """Delete every ready, unlocked, unpinned object; returns how many were deleted."""
        with self._lock:
            victims = [e for lru in self._lrus for e in lru.pop_all()]
            for entry in victims:
                self._doom(entry, "cleared")
            return len(victims)

    def _doom(self, entry: Entry, reason: str = "deleted") -> None:
        """Discard ``entry``: unreachable by key, out of the LRU, shares dropped; its slot freed
        now unless a copy pins it. A readable object's removal is an event (``reason``)."""
        if entry.doomed:
            return
        if entry.ready:
            if self._on_event is not None:
                self._on_event("removed", entry, reason)
            entry.lru.pop(entry, None)
        else:
            self._end_write(entry)
            self._doomed_writes.setdefault((entry.writer, entry.key), []).append(entry)
        del self._objects[entry.key]
        for owner in entry.shares:
            self._owner_leases.drop(owner, entry)
        entry.shares.clear()
        entry.doomed = True
        if entry.pins:
            self._counts["deferred_frees"] += 1
        else:
            self.arenas[entry.device].free(entry.offset)

    def _alloc(self, device: int, slot_bytes: int) -> int | None:
        slab, lru = self.arenas[device], self._lrus[device]
        offset = slab.alloc(slot_bytes)
        while offset is None:
            victims = lru.victims(slot_bytes)
            if not victims:
                break
            self._counts["evictions"][device] += len(victims)
            for entry in victims:
                self._doom(entry, "evicted")
            offset = slab.alloc(slot_bytes)
        return offset
