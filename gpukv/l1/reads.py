"""The read side of the L1 manager: reader shares (``reserve_read``/``finish_read``) and copy
pins (``pin``/``pin_handles``/``unpin``/``end_read``), the lookup and retrieve hot paths.

A mixin of :class:`gpukv.l1.manager.L1Manager` (whose module docstring states the rules): it
works on the manager's state under its lock (``_objects``, ``_owner_leases``, ``_stamp``,
``_clock``, ``read_lease_s``) and hands an object that lost its last share or pin to the
manager's ``_settle``. The hot loops inline their per-key work (no helper call per key) and keep
the invariants the helpers state: an owner has a lease on an object exactly while it holds shares
of it (in ``entry.shares``); an idle object is in its class LRU (``entry.lru``), a busy one may
be; every share count stays in ``[1, MAX_READERS]``.
"""

from __future__ import annotations

from typing import Hashable, Iterable, Sequence

from gpukv.constants import MAX_READERS
from gpukv.l1.entry import Entry, Status, share_count

OK, NOT_FOUND, NOT_READY, WRONG_STATE = Status.OK, Status.NOT_FOUND, Status.NOT_READY, Status.WRONG_STATE


class L1Reads:
    """Reader shares and copy pins (see the module docstring)."""

    # -- shares --------------------------------------------------------------------------------
    def reserve_read(self, keys: Iterable[Hashable], extra_count: int = 0, *,
                     owner: Hashable = None, top_up: bool = False) -> list[Status]:
        """Give ``owner`` ``1 + extra_count`` shares per ready key (and refresh its lease); with
        ``top_up`` only what brings ``owner`` up to that many. NOT_FOUND if absent, NOT_READY
        while written, WRONG_STATE past MAX_READERS for the owner (nothing taken for that key)."""
        count = extra_count + 1 if type(extra_count) is int and 0 <= extra_count < MAX_READERS \
            else share_count(extra_count)
        out: list[Status] = []
        with self._lock:  # the lookup hot path: no helper call per key
            get, leases = self._objects.get, self._owner_leases
            deadline = self._clock() + self.read_lease_s
            owned = leases.get(owner)
            if owned is None:
                owned = leases[owner] = {}
            for key in keys:
                entry = get(key)
                if entry is None:
                    out.append(NOT_FOUND)
                    continue
                if not entry.ready:
                    out.append(NOT_READY)
                    continue
                shares = entry.shares
                held = shares.get(owner)
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

    def reserve_prefix(self, key_lists: Sequence[Sequence[Hashable]], extra_count: int = 0, *,
                       owner: Hashable = None) -> int:
        """The lookup's L1 step under one lock: ``n``, the number of leading keys ready in every
        list of ``key_lists`` (one list per rank's key space), then ``owner``'s shares on the
        first ``n`` keys of each list topped up to ``1 + extra_count`` (as ``reserve_read(...,
        top_up=True)``, which cannot fail for them) and its leases refreshed. Returns ``n``;
        nothing is taken when it is 0. Nothing can be evicted between the count and the shares."""
        count = extra_count + 1 if type(extra_count) is int and 0 <= extra_count < MAX_READERS \
            else share_count(extra_count)
        with self._lock:  # the lookup hot path: prefix_hits and reserve_read in one pass each
            get = self._objects.get
            rows: list[list[Entry]] = []
            n = None
            for keys in key_lists:
                row: list[Entry] = []
                for key in keys if n is None else keys[:n]:
                    entry = get(key)
                    if entry is None or not entry.ready:
                        break
                    row.append(entry)
                n = len(row)
                rows.append(row)
                if not n:
                    return 0
            if not n:
                return 0
            leases = self._owner_leases
            deadline = self._clock() + self.read_lease_s
            owned = leases.get(owner)
            if owned is None:
                owned = leases[owner] = {}
            for row in rows:
                for entry in row if len(row) == n else row[:n]:
                    shares = entry.shares
                    held = shares.get(owner)
                    if held is None:
                        shares[owner] = count
                    else:
                        if held < count:
                            shares[owner] = count
                        del owned[entry]  # its lease exists while shares are held: to the end
                    owned[entry] = deadline
        return n

    def finish_read(self, keys: Iterable[Hashable], extra_count: int = 0, *,
                    owner: Hashable = None) -> list[Status]:
        """Release ``1 + extra_count`` of ``owner``'s shares per key; WRONG_STATE (no change) if
        the owner holds fewer. A temporary object whose count reaches zero is freed."""
        count = extra_count + 1 if type(extra_count) is int and 0 <= extra_count < MAX_READERS \
            else share_count(extra_count)
        out: list[Status] = []
        with self._lock:  # the retrieve hot path: _drop_shares and _settle inlined
            get, owned, stamp = self._objects.get, self._owner_leases.get(owner), self._stamp
            for key in keys:
                entry = get(key)
                if entry is None:
                    out.append(NOT_FOUND)
                    continue
                shares = entry.shares
                held = shares.pop(owner, 0)
                if held == count:
                    del owned[entry]
                elif held > count:
                    shares[owner] = held - count
                else:
                    if held:
                        shares[owner] = held
                    out.append(WRONG_STATE)
                    continue
                if not shares and not entry.pins:  # a live object with shares is ready
                    if entry.temporary:
                        self._doom(entry, "released")
                    else:  # SizeClassLRU.touch inlined
                        stamp += 1
                        entry.stamp = stamp
                        try:
                            entry.lru.move_to_end(entry)
                        except KeyError:  # the LRU dropped it while it was busy
                            entry.lru[entry] = entry
                out.append(OK)
            self._stamp = stamp
            if owned is not None and not owned:
                del self._owner_leases[owner]
        return out

    def _add_shares(self, entry: Entry, owner: Hashable, count: int, now: float) -> None:
        """The first ``count`` (<= MAX_READERS) shares of an object just made ready."""
        entry.shares[owner] = count
        self._owner_leases.refresh(owner, entry, now + self.read_lease_s)

    def _drop_shares(self, entry: Entry, owner: Hashable, count: int | None = None, *,
                     lease_gone: bool = False) -> int:
        """Release ``count`` (None: all) of ``owner``'s shares of ``entry``; returns how many.
        ``lease_gone``: the caller already took the lease out of the index."""
        held = entry.shares.pop(owner)
        count = held if count is None else count
        if count < held:
            entry.shares[owner] = held - count
        elif not lease_gone:
            self._owner_leases.drop(owner, entry)
        if not entry.shares:
            self._settle(entry)
        return count

    # -- pins ----------------------------------------------------------------------------------
    def pin(self, keys: Iterable[Hashable]) -> tuple[list[Status], list[Entry | None]]:
        """Pin ready objects for a copy out of them; NOT_FOUND / NOT_READY as ``reserve_read``."""
        statuses: list[Status] = []
        handles: list[Entry | None] = []
        with self._lock:  # _pin inlined
            get = self._objects.get
            for key in keys:
                entry = get(key)
                if entry is None or not entry.ready:
                    statuses.append(NOT_FOUND if entry is None else NOT_READY)
                    handles.append(None)
                    continue
                entry.pins += 1  # an idle object stays in the LRU, which skips busy ones
                statuses.append(OK)
                handles.append(entry)
        return statuses, handles

    def pin_handles(self, handles: Iterable[Entry]) -> list[Status]:
        """Pin objects already named by handles (NOT_FOUND once discarded, NOT_READY if writing)."""
        out: list[Status] = []
        with self._lock:
            for entry in handles:
                status = NOT_FOUND if entry.doomed else OK if entry.ready else NOT_READY
                if status is OK:
                    self._pin(entry)
                out.append(status)
        return out

    def unpin(self, handles: Iterable[Entry]) -> None:
        """Release pins taken by ``pin``/``pin_handles`` (the last one frees a discarded object)."""
        with self._lock:
            for entry in handles:
                self._unpin(entry)

    def end_read(self, handles: Iterable[Entry], *, owner: Hashable = None) -> int:
        """After a copy out of pinned objects: release one of ``owner``'s shares of each (where
        it still holds one), then unpin. Returns the shares released."""
        released = 0
        with self._lock:  # the retrieve hot path: _drop_shares, _unpin and _settle inlined
            owned, stamp = self._owner_leases.get(owner), self._stamp
            for entry in handles:
                shares = entry.shares
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
                        self._settle(entry)
                    else:  # SizeClassLRU.touch inlined
                        stamp += 1
                        entry.stamp = stamp
                        try:
                            entry.lru.move_to_end(entry)
                        except KeyError:  # the LRU dropped it while it was busy
                            entry.lru[entry] = entry
            self._stamp = stamp
            if owned is not None and not owned:
                del self._owner_leases[owner]
        return released

    def _pin(self, entry: Entry) -> Entry:
        entry.pins += 1
        return entry

    def _unpin(self, entry: Entry) -> None:
        assert entry.pins > 0, entry.key
        entry.pins -= 1
        if not entry.pins:
            self._settle(entry)
