"""The L1's object table: the live objects by key, each key at most once, and which are ready.

An object is *live* from ``reserve_write`` until it is discarded (evicted, deleted, released, its
write aborted or expired). A live object is *writing* (invisible to readers) or *ready*. A
discarded object is unreachable by key, so its key can be stored afresh at once, and it stays
discarded: the table sets ``entry.doomed`` and never clears it. The table is the only writer of
``entry.ready`` and ``entry.doomed``: absent -> writing -> ready, and from either -> discarded.

The ready objects have a dict of their own, so that the lookup paths resolve a key and learn that
it is readable in one dict lookup. The hot loops take ``get`` (any live object), ``get_ready`` or
``add`` once per call: each is a dict's own method. Not thread-safe: the L1 manager's lock guards
it.
"""

from __future__ import annotations

from typing import Hashable, Iterable, Iterator, Sequence

from gpukv.l1.entry import Entry, Status


class ObjectTable:
    """``key -> Entry`` of live objects, and ``key -> Entry`` of the ready ones among them."""

    __slots__ = ("_live", "_ready", "get", "get_ready", "add")

    def __init__(self) -> None:
        self._live: dict[Hashable, Entry] = {}
        self._ready: dict[Hashable, Entry] = {}
        self.get = self._live.get  # key -> live Entry or None
        self.get_ready = self._ready.get  # key -> ready Entry or None
        # add(key, entry): a new write (neither ready nor discarded) of a key that is not live;
        # the dict's own __setitem__, as the caller has just looked the key up
        self.add = self._live.__setitem__

    # -- state changes ---------------------------------------------------------------------------
    def mark_ready(self, entry: Entry) -> None:
        """The live write ``entry`` became readable."""
        assert not entry.ready and not entry.doomed, entry.key
        entry.ready = True
        self._ready[entry.key] = entry

    def discard(self, entry: Entry) -> None:
        """Take the live ``entry`` out for good: unreachable by key, ``doomed`` set."""
        assert not entry.doomed, entry.key  # (so it is the live object of its key)
        del self._live[entry.key]
        if entry.ready:
            del self._ready[entry.key]
        entry.doomed = True

    # -- lookups ---------------------------------------------------------------------------------
    def entry(self, key: Hashable) -> Entry:
        """The live object of ``key``; KeyError naming the key if there is none."""
        entry = self._live.get(key)
        if entry is None:
            raise KeyError(f"no L1 object for key {key!r}")
        return entry

    def unreadable(self, key: Hashable) -> Status:
        """Why ``key`` has no ready object: NOT_READY while it is written, else NOT_FOUND."""
        return Status.NOT_READY if key in self._live else Status.NOT_FOUND

    def is_live(self, key: Hashable) -> bool:
        return key in self._live

    def is_ready(self, key: Hashable) -> bool:
        return key in self._ready

    def leading_ready(self, keys: Iterable[Hashable]) -> int:
        """How many leading keys are ready."""
        get, hits = self._ready.get, 0
        for key in keys:
            if get(key) is None:
                break
            hits += 1
        return hits

    def ready_prefix(self, key_lists: Sequence[Sequence[Hashable]]) -> list[list[Entry]]:
        """The first ``n`` ready objects of every list, ``n`` being the number of leading keys
        ready in every list (one row per list; [] when ``n`` is 0 or there is no list)."""
        get = self._ready.get
        rows: list[list[Entry]] = []
        n = None
        for keys in key_lists:
            row: list[Entry] = []
            for key in keys if n is None else keys[:n]:
                entry = get(key)
                if entry is None:
                    break
                row.append(entry)
            n = len(row)
            if not n:
                return []
            rows.append(row)
        return [row if len(row) == n else row[:n] for row in rows]

    def values(self) -> Iterator[Entry]:
        """The live objects (a view: do not change the table while iterating)."""
        return iter(self._live.values())

    def items(self) -> Iterator[tuple[Hashable, Entry]]:
        """``(key, entry)`` of the live objects (a view, as ``values``)."""
        return iter(self._live.items())

    @property
    def num_live(self) -> int:
        return len(self._live)

    @property
    def num_ready(self) -> int:
        return len(self._ready)
