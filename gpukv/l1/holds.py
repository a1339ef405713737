"""The L1's hold book: what keeps an object from being evicted or freed, and when that stops.

- *Shares*: owner x object -> a count of reader shares (``entry.shares``), each (owner, object)
  with a lease (a :class:`~gpukv.l1.leases.LeaseIndex`) exactly while the owner holds shares of
  it. A count is in ``[1, MAX_READERS]``; taking past it, or releasing more than the owner holds,
  is WRONG_STATE and changes nothing; ``1 + extra_count`` shares are one step on one integer.
- *Pins*: the copies moving the object's bytes now (``entry.pins``): a write's own pin from
  ``reserve_write`` to its end, a reader's from ``pin`` to ``unpin``/``end_read``. A discarded
  object keeps its slot while pinned (``discard``).

When an object's last hold goes it is *released*: a ready, permanent one becomes the most recent
idle object (:func:`gpukv.l1.eviction.touch`, inlined in the hot loops), a discarded or temporary
one is returned for the object pool to free or discard. The callers pass the object table (or its
``get``) per call, so each hot path is one pass over its keys with one dict lookup each. The only
writer of ``entry.shares``, ``entry.pins`` and ``entry.stamp``. Not thread-safe: the L1
manager's lock guards it.
"""

from __future__ import annotations

from typing import Callable, Hashable, Iterable, Sequence

from gpukv.constants import MAX_READERS
from gpukv.l1.entry import Entry, Status
from gpukv.l1.eviction import touch
from gpukv.l1.leases import LeaseIndex
from gpukv.l1.objects import ObjectTable

OK, NOT_FOUND, NOT_READY, WRONG_STATE = (Status.OK, Status.NOT_FOUND, Status.NOT_READY,
                                        Status.WRONG_STATE)
Lookup = Callable[[Hashable], "Entry | None"]


class HoldBook:
    """Reader shares with leases, copy pins, and the recency of released objects."""

    __slots__ = ("_leases", "stamp", "deferred_frees")

    def __init__(self) -> None:
        self._leases = LeaseIndex()
        self.stamp = 0  # recency counter (larger = released more recently), all devices
        self.deferred_frees = 0  # discarded objects whose free waited for their last unpin

    # -- shares ----------------------------------------------------------------------------------
    def take(self, keys: Iterable[Hashable], table: ObjectTable, owner: Hashable, count: int,
             deadline: float, top_up: bool = False) -> list[Status]:
        """Give ``owner`` ``count`` more shares of each key ready in ``table`` (``top_up``: as
        many as bring it to ``count``) and set its lease to ``deadline``. Per key: OK,
        ``table.unreadable(key)`` where none is ready, WRONG_STATE past MAX_READERS (nothing
        taken)."""
        out: list[Status] = []
        get_ready = table.get_ready
        leases = self._leases
        owned = leases.get(owner)
        if owned is None:
            owned = leases[owner] = {}
        for key in keys:  # the lookup hot path: no call per key but the lookup
            entry = get_ready(key)
            if entry is None:
                out.append(table.unreadable(key))
                continue
            shares = entry.shares
            held = shares.get(owner) if shares else None
            if held is None:  # the common case: first shares (count <= MAX_READERS)
                shares[owner] = count
            else:
                new = (held if held >= count else count) if top_up else held + count
                if new > MAX_READERS:
                    out.append(WRONG_STATE)
                    continue
                shares[owner] = new
                del owned[entry]  # its lease exists while shares are held: to the end
            owned[entry] = deadline
            out.append(OK)
        if not owned:
            del leases[owner]
        return out

    def top_up(self, rows: Sequence[Sequence[Entry]], owner: Hashable, count: int,
               deadline: float) -> None:
        """Bring ``owner``'s shares of every (ready) object of ``rows`` to at least ``count``
        (<= MAX_READERS: it cannot fail) and set its leases to ``deadline``."""
        owned = self._leases.owned(owner)
        for row in rows:
            for entry in row:
                shares = entry.shares
                held = shares.get(owner) if shares else None
                if held is None:
                    shares[owner] = count
                else:
                    if held < count:
                        shares[owner] = count
                    del owned[entry]
                owned[entry] = deadline
        self._leases.forget_if_idle(owner)

    def give(self, entry: Entry, owner: Hashable, count: int, deadline: float) -> None:
        """The first ``count`` (<= MAX_READERS) shares of ``entry``, an object just made ready."""
        assert not entry.shares and entry.ready, entry.key
        entry.shares[owner] = count
        self._leases.refresh(owner, entry, deadline)

    def release(self, keys: Iterable[Hashable], get: Lookup, owner: Hashable,
                count: int) -> tuple[list[Status], list[Entry]]:
        """Release ``count`` of ``owner``'s shares of each key: OK; NOT_FOUND where ``get`` finds
        nothing; WRONG_STATE (no change) where ``owner`` holds fewer. Returns the statuses and
        the released objects to settle (see the module docstring)."""
        out: list[Status] = []
        settle: list[Entry] = []
        owned, stamp = self._leases.get(owner), self.stamp
        for key in keys:  # the retrieve hot path
            entry = get(key)
            if entry is None:
                out.append(NOT_FOUND)
                continue
            shares = entry.shares
            held = shares.pop(owner, 0)
            if held == count:
                del owned[entry]
                if not shares and not entry.pins:  # released (a shared object is live, ready)
                    if entry.temporary:
                        settle.append(entry)
                    else:  # eviction.touch inlined
                        stamp += 1
                        entry.stamp = stamp
                        lru = entry.lru
                        try:
                            lru.move_to_end(entry)
                        except KeyError:  # the LRU dropped it while it was busy
                            lru[entry] = entry
            elif held > count:
                shares[owner] = held - count
            else:
                if held:
                    shares[owner] = held
                out.append(WRONG_STATE)
                continue
            out.append(OK)
        self.stamp = stamp
        if owned is not None and not owned:
            del self._leases[owner]
        return out, settle

    def release_owner(self, owner: Hashable, only: Iterable[Entry | None] | None = None
                      ) -> tuple[int, list[Entry]]:
        """Drop all of ``owner``'s shares (of the objects ``only`` names, when given: each once;
        None and objects it holds nothing of are skipped). Returns the shares dropped and the
        objects to settle."""
        owned = self._leases.get(owner)
        if not owned:
            return 0, []
        targets = list(owned) if only is None else [e for e in dict.fromkeys(only) if e in owned]
        released, lost = 0, []
        for entry in targets:  # the end of every request
            shares = entry.shares
            released += shares.pop(owner)
            del owned[entry]
            if not shares:
                lost.append(entry)
        self._leases.forget_if_idle(owner)
        return released, self._unshared(lost) if lost else lost

    def expire(self, now: float) -> tuple[int, list[Entry]]:
        """Drop every share whose lease deadline is ``<= now``: (shares dropped, to settle)."""
        released, lost = 0, []
        for owner, entry in self._leases.pop_expired(now):
            shares = entry.shares
            released += shares.pop(owner)
            if not shares:
                lost.append(entry)
        return released, self._unshared(lost) if lost else lost

    # -- pins ------------------------------------------------------------------------------------
    def pin(self, keys: Iterable[Hashable],
            table: ObjectTable) -> tuple[list[Status], list[Entry | None]]:
        """Pin the object of each key ready in ``table``: OK and its handle, or
        ``table.unreadable(key)`` and None."""
        statuses: list[Status] = []
        handles: list[Entry | None] = []
        get_ready = table.get_ready
        for key in keys:  # the retrieve hot path
            entry = get_ready(key)
            if entry is None:
                statuses.append(table.unreadable(key))
                handles.append(None)
                continue
            entry.pins += 1
            statuses.append(OK)
            handles.append(entry)
        return statuses, handles

    def pin_handles(self, handles: Iterable[Entry]) -> list[Status]:
        """Pin objects named by handles: OK if ready, NOT_READY while written, NOT_FOUND once
        discarded (nothing pinned)."""
        out: list[Status] = []
        for entry in handles:
            status = NOT_FOUND if entry.doomed else OK if entry.ready else NOT_READY
            if status is OK:
                entry.pins += 1
            out.append(status)
        return out

    def unpin(self, handles: Iterable[Entry], owner: Hashable = None, *,
              one_share: bool = False) -> tuple[int, list[Entry]]:
        """Release one pin of each handle, after one of ``owner``'s shares of it where it holds
        one if ``one_share`` (``end_read``). Returns the shares released and the objects to
        settle."""
        released, settle = 0, []
        owned, stamp = self._leases.get(owner) if one_share else None, self.stamp
        for entry in handles:  # the retrieve hot path
            shares = entry.shares
            if owned is not None:
                held = shares.pop(owner, 0)  # (a discarded object holds no shares)
                if held:
                    released += 1
                    if held == 1:
                        del owned[entry]
                    else:
                        shares[owner] = held - 1
            assert entry.pins > 0, entry.key
            pins = entry.pins = entry.pins - 1
            if not pins and not shares:
                if entry.doomed or entry.temporary:
                    settle.append(entry)
                else:  # ready (a live write holds its pin until then): eviction.touch inlined
                    stamp += 1
                    entry.stamp = stamp
                    lru = entry.lru
                    try:
                        lru.move_to_end(entry)
                    except KeyError:
                        lru[entry] = entry
        self.stamp = stamp
        if owned is not None and not owned:
            del self._leases[owner]
        return released, settle

    def unpin_one(self, entry: Entry) -> bool:
        """``unpin`` of one handle (a write's own pin): True if the caller must settle it."""
        assert entry.pins > 0, entry.key
        entry.pins -= 1
        if entry.pins or entry.shares:
            return False
        if entry.doomed or entry.temporary:
            return True
        self.stamp += 1
        touch(entry, self.stamp)
        return False

    def discard(self, entry: Entry) -> bool:
        """``entry`` is being discarded: every owner's shares of it go (nothing to settle).
        Returns True (counted) if a pin keeps its slot until the last ``unpin``, False if the
        caller frees it now."""
        for owner in entry.shares:
            self._leases.drop(owner, entry)
        entry.shares.clear()
        if entry.pins:
            self.deferred_frees += 1
            return True
        return False

    # -- release and queries ---------------------------------------------------------------------
    def _unshared(self, lost: list[Entry]) -> list[Entry]:
        """Objects (live) that lost their last share, in order: touch the unpinned permanent
        ones; return the unpinned temporary ones, to settle."""
        settle, stamp = [], self.stamp
        for entry in lost:
            if entry.pins:
                continue
            if entry.temporary:
                settle.append(entry)
            else:  # eviction.touch inlined
                stamp += 1
                entry.stamp = stamp
                lru = entry.lru
                try:
                    lru.move_to_end(entry)
                except KeyError:
                    lru[entry] = entry
        self.stamp = stamp
        return settle

    def entries_of(self, owner: Hashable) -> list[Entry]:
        """The objects ``owner`` holds shares of, in lease deadline order."""
        return list(self._leases.get(owner, ()))

    def deadline_of(self, entry: Entry, owner: Hashable) -> float | None:
        """``owner``'s lease deadline on ``entry`` (None if it holds no shares of it)."""
        return self._leases.get(owner, {}).get(entry)

    @property
    def num_leases(self) -> int:
        """(owner, object) pairs with shares, each with its lease."""
        return self._leases.num_leases()

    @property
    def num_owners(self) -> int:
        """Owners holding at least one share."""
        return len(self._leases)
