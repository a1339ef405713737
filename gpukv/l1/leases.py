"""Read-share leases of the L1 manager: per owner, the keys it holds shares on, with deadlines.

``LeaseIndex`` is a dict ``owner -> OrderedDict[key, deadline]`` holding only owners with at least
one lease. All read leases share one duration and deadlines come from a monotonic clock, so an
owner's OrderedDict stays in deadline order as long as a refreshed key moves to the end; expiry
then stops at each owner's first live lease and costs O(owners + expired leases). Nothing is
allocated per share (one OrderedDict node per (owner, key)), keeping the garbage collector off the
hot path.

The L1 hot loops (``reserve_read``/``finish_read``) take an owner's OrderedDict once per call
(``owned`` or ``get``) and set, move or delete keys in it themselves, then call
``forget_if_idle``; everything else goes through the methods. Not thread-safe: the L1 manager's
lock guards it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable


class LeaseIndex(dict[Hashable, OrderedDict[Hashable, float]]):
    """``owner -> OrderedDict key -> deadline``, each OrderedDict in deadline order (oldest first).

    A dict itself, so that the hot loops' per-call lookups and ``len()`` stay plain dict operations.

    Precondition of ``refresh`` (and of callers editing an owner's OrderedDict directly): a new
    deadline is >= every deadline the owner already has.
    """

    __slots__ = ()

    def owned(self, owner: Hashable) -> OrderedDict[Hashable, float]:
        """``owner``'s leases, created empty if it has none (call ``forget_if_idle`` after)."""
        owned = self.get(owner)
        if owned is None:
            owned = self[owner] = OrderedDict()
        return owned

    def refresh(self, owner: Hashable, key: Hashable, deadline: float) -> None:
        """Set ``owner``'s lease on ``key`` to ``deadline``, now its latest."""
        owned = self.owned(owner)
        owned[key] = deadline
        owned.move_to_end(key)

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
            while owned:
                key, deadline = next(iter(owned.items()))
                if deadline > now:
                    break
                del owned[key]
                expired.append((owner, key))
            self.forget_if_idle(owner)
        return expired

    def pop_owner(self, owner: Hashable) -> list[Hashable]:
        """Remove ``owner`` and return the keys it leased, in deadline order ([] if none)."""
        return list(self.pop(owner, ()))

    def num_leases(self) -> int:
        """Leases over all owners."""
        return sum(len(owned) for owned in self.values())
