"""Read-share leases of the L1 manager: per owner, the objects it holds shares on, with deadlines.

``LeaseIndex`` is a dict ``owner -> dict[key, deadline]`` holding only owners with at least one
lease. All read leases share one duration and deadlines come from a monotonic clock, so an owner's
dict (insertion-ordered) stays in deadline order as long as a refreshed key is moved to the end
(deleted and inserted again); expiry then stops at each owner's first live lease and costs
O(owners + expired leases). Plain dicts, not OrderedDicts: an insert or delete allocates nothing,
keeping the hot path and the garbage collector light.

The L1's "keys" here are its object records (hashed by identity, cheaper than hashing a chunk
key again). The hold book (:mod:`gpukv.l1.holds`) owns the one index: its hot loops take an
owner's dict once per call (``owned`` or ``get``) and insert, move or delete entries in it
themselves, then drop the owner if it holds nothing; everything else goes through the methods.
Not thread-safe: the L1 manager's lock guards it.
"""

from __future__ import annotations

from typing import Hashable


class LeaseIndex(dict[Hashable, dict[Hashable, float]]):
    """``owner -> dict key -> deadline``, each inner dict in deadline order (oldest first).

    A dict itself, so that the hot loops' per-call lookups and ``len()`` stay plain dict operations.

    Precondition of ``refresh`` (and of callers editing an owner's dict directly): a new deadline
    is >= every deadline the owner already has.
    """

    __slots__ = ()

    def owned(self, owner: Hashable) -> dict[Hashable, float]:
        """``owner``'s leases, created empty if it has none (call ``forget_if_idle`` after)."""
        owned = self.get(owner)
        if owned is None:
            owned = self[owner] = {}
        return owned

    def refresh(self, owner: Hashable, key: Hashable, deadline: float) -> None:
        """Set ``owner``'s lease on ``key`` to ``deadline``, now its latest."""
        owned = self.owned(owner)
        owned.pop(key, None)
        owned[key] = deadline

    def forget_if_idle(self, owner: Hashable) -> None:
        """Drop ``owner`` if it holds no lease (no-op for an unknown owner)."""
        if not self.get(owner, True):
            del self[owner]

    def drop(self, owner: Hashable, key: Hashable) -> None:
        """Remove ``owner``'s lease on ``key``; KeyError if it has none."""
        del self[owner][key]
        self.forget_if_idle(owner)

    def pop_expired(self, now: float) -> list[tuple[Hashable, Hashable]]:
        """Remove and return ``(owner, key)`` of every lease with ``deadline <= now``: owners in
        index order, each owner's keys in deadline order."""
        expired: list[tuple[Hashable, Hashable]] = []
        for owner, owned in list(self.items()):
            gone = []
            for key, deadline in owned.items():
                if deadline > now:
                    break
                gone.append(key)
            for key in gone:
                del owned[key]
            expired.extend((owner, key) for key in gone)
            self.forget_if_idle(owner)
        return expired

    def pop_owner(self, owner: Hashable) -> list[Hashable]:
        """Remove ``owner`` and return the keys it leased, in deadline order ([] if none)."""
        return list(self.pop(owner, ()))

    def num_leases(self) -> int:
        """Leases over all owners."""
        return sum(len(owned) for owned in self.values())
