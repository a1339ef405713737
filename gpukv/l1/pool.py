"""The L1's object pool: its structures, and the rules that join them.

The structures each own one invariant and have their own tests: the object table
(:mod:`~gpukv.l1.objects`: key -> live object, states), the write book (:mod:`~gpukv.l1.writes`:
unfinished writes, write leases), the hold book (:mod:`~gpukv.l1.holds`: reader shares with
leases, copy pins, recency), and per device a slab arena (:mod:`~gpukv.l1.slab`) and a
size-class LRU (:mod:`~gpukv.l1.eviction`). What none of them can decide alone lives here:

- *discard*: an object leaves the table, and its LRU or the live writes; every owner's shares
  go; its slot is freed now, or by its last unpin; a readable object's removal is an event.
- *settle*: an object the hold book released and could not make idle is freed if discarded, or
  discarded if temporary (a tier hit lives only while something holds it).
- *allocate*: a slot of a device, evicting that device's LRU victims until one is free.
- the write path (reserve, finish, abort) and the lifetime calls made of these (expire, release
  an owner, delete, clear), one key or handle at a time in the caller's order.

It keeps the counters and builds the stats. Not thread-safe, and it does not validate
arguments: the L1 manager (:mod:`~gpukv.l1.manager`) does both, taking its lock once per call.
"""

from __future__ import annotations

from typing import Callable, Hashable, Iterable, Sequence

from gpukv.l1.entry import Entry, Status
from gpukv.l1.eviction import SizeClassLRU
from gpukv.l1.holds import HoldBook
from gpukv.l1.objects import ObjectTable
from gpukv.l1.slab import SlabArena
from gpukv.l1.writes import WriteBook

EventSink = Callable[[str, Entry, str], None]


class ObjectPool:
    """The structures of one L1 (public attributes, changed only through this pool's rules and
    the manager) and the rules joining them (see the module docstring)."""

    def __init__(self, arenas: Sequence[SlabArena], on_event: EventSink | None = None) -> None:
        self.arenas: list[SlabArena] = list(arenas)
        self.lrus: list[SizeClassLRU[Entry]] = [SizeClassLRU(a) for a in self.arenas]
        self.objects = ObjectTable()
        self.writes = WriteBook()
        self.holds = HoldBook()
        self.evictions = [0] * len(self.arenas)  # per device
        self.expired_shares = self.expired_writes = 0
        self.on_event = on_event

    # -- the joining rules -----------------------------------------------------------------------
    def discard(self, entry: Entry, reason: str = "deleted") -> None:
        """Discard ``entry`` (no-op if it already is): unreachable by key, out of its LRU or the
        live writes, every share dropped; its slot freed now unless a copy pins it."""
        if entry.doomed:
            return
        if entry.ready:
            if self.on_event is not None:
                self.on_event("removed", entry, reason)
            self.lrus[entry.device].discard(entry)
        else:
            self.writes.discard(entry)
        self.objects.discard(entry)
        if not (entry.shares or entry.pins) or not self.holds.discard(entry):
            self.arenas[entry.device].free(entry.offset)  # (else its last unpin frees it)

    def settle(self, entries: Iterable[Entry]) -> None:
        """Released objects the hold book returned (in order): free the discarded ones, discard
        the temporary ones (a tier hit lives only while held)."""
        for entry in entries:
            if entry.doomed:
                self.arenas[entry.device].free(entry.offset)
            else:
                self.discard(entry, "released")

    def alloc(self, device: int, slot_bytes: int) -> int | None:
        """A slot of ``slot_bytes`` in ``device``'s arena, evicting its LRU's victims until one
        is free; None when nothing (more) is evictable (evictions done stay done)."""
        slab, lru = self.arenas[device], self.lrus[device]
        offset = slab.alloc(slot_bytes)
        while offset is None:
            victims = lru.victims(slot_bytes)
            if not victims:
                break
            self.evictions[device] += len(victims)
            for entry in victims:
                self.discard(entry, "evicted")
            offset = slab.alloc(slot_bytes)
        return offset

    # -- state changes made of the rules ---------------------------------------------------------
    def reserve_writes(self, keys: Iterable[Hashable], device: int, nbytes: int, slot_bytes: int,
                       temporary: bool, writer: Hashable, deadline: float
                       ) -> tuple[list[Status], list[Entry | None]]:
        """A live write of ``nbytes`` per absent key in a ``slot_bytes`` slot of ``device``
        (evicting), holding its write pin and leased to ``deadline``: OK and its handle;
        NOT_WRITABLE for a live key; OUT_OF_MEMORY from the first key that finds no room on."""
        statuses: list[Status] = []
        handles: list[Entry | None] = []
        objects = self.objects
        get, add, class_lru = objects.get, objects.add, self.lrus[device].add_class(slot_bytes)
        full, ok = slot_bytes > self.arenas[device].capacity_bytes, Status.OK
        try:
            for key in keys:
                live = get(key) is not None
                offset = None if full or live else self.alloc(device, slot_bytes)
                if offset is None:
                    full = full or not live
                    statuses.append(Status.OUT_OF_MEMORY if full else Status.NOT_WRITABLE)
                    handles.append(None)
                    continue
                entry = Entry(key, device, nbytes, slot_bytes, offset, temporary, writer,
                              deadline, class_lru)  # holding the write's own pin
                add(key, entry)
                statuses.append(ok)
                handles.append(entry)
        finally:  # (an unhashable key raises: the writes before it stay whole)
            self.writes.begin_all(handles, writer)
        return statuses, handles

    def finish_writes(self, entries: Iterable[Entry], reader: Hashable, count: int | None,
                      deadline: float) -> None:
        """End writes whose pin is held, one at a time: a live one becomes ready (``reader``
        gets ``count`` shares, when given, leased to ``deadline``), a discarded one is let go;
        then its write pin is released."""
        objects, writes, holds, on_event = self.objects, self.writes, self.holds, self.on_event
        for entry in entries:
            if not entry.doomed:
                writes.finish(entry)
                objects.mark_ready(entry)
                if on_event is not None:
                    on_event("stored", entry, "loaded" if entry.temporary else "new")
                if count is not None:
                    holds.give(entry, reader, count, deadline)
            else:
                writes.release(entry)
            if holds.unpin_one(entry):
                self.settle((entry,))

    def abort_writes(self, entries: Iterable[Entry]) -> None:
        """Discard writes whose pin is held (if they are not yet), one at a time, and release
        their pins."""
        for entry in entries:
            self.discard(entry)
            self.writes.release(entry)
            if self.holds.unpin_one(entry):
                self.settle((entry,))

    def expire(self, now: float) -> int:
        """Drop the shares and discard the writes whose lease deadline is ``<= now``; returns
        the shares released."""
        released, settle = self.holds.expire(now)
        self.settle(settle)
        for entry in self.writes.expired(now):
            self.discard(entry)
            self.expired_writes += 1
        self.expired_shares += released
        return released

    def release_owner(self, owner: Hashable, keys: Iterable[Hashable] | None) -> int:
        """Drop ``owner``'s shares (of ``keys`` only, when given) and, without ``keys``, discard
        its live writes; returns the shares released."""
        entries = None if keys is None else map(self.objects.get, keys)
        released, settle = self.holds.release_owner(owner, entries)
        if settle:
            self.settle(settle)
        if keys is None:
            for entry in self.writes.of_writer(owner):
                self.discard(entry)
        return released

    def delete(self, keys: Iterable[Hashable], force: bool) -> list[Status]:
        """Discard the object of each key: OK; NOT_FOUND; LOCKED (nothing done) for one that is
        shared, pinned or written, unless ``force``."""
        out: list[Status] = []
        get = self.objects.get
        for key in keys:
            entry = get(key)
            if entry is None:
                out.append(Status.NOT_FOUND)
            elif not (entry.idle or force):
                out.append(Status.LOCKED)
            else:
                self.discard(entry)
                out.append(Status.OK)
        return out

    def clear(self) -> int:
        """Discard every idle object; returns how many."""
        victims = [e for lru in self.lrus for e in lru.pop_all()]
        for entry in victims:
            self.discard(entry, "cleared")
        return len(victims)

    # -- counters --------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Counters over all structures (see ``L1Manager.stats``)."""
        entries = list(self.objects.values())
        writing = len(self.writes)
        per_device = [dict(used_bytes=a.used_bytes, capacity_bytes=a.capacity_bytes, objects=0,
                           read_locked=0, shares=0, evictions=self.evictions[i])
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
            "used_bytes": sum(a.used_bytes for a in self.arenas),
            "capacity_bytes": sum(a.capacity_bytes for a in self.arenas),
            "evictions": sum(self.evictions),
            "expired_shares": self.expired_shares,
            "expired_writes": self.expired_writes,
            "deferred_frees": self.holds.deferred_frees,
            "slabs_in_use": sum(a.num_slabs for a in self.arenas),
            "leases": self.holds.num_leases,
            "owners": self.holds.num_owners,
            "devices": per_device,
        }
