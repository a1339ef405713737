"""The L1's unfinished writes: the live ones by lease deadline and by writer, and the discarded
ones whose writer still holds the write pin.

A write begins at ``reserve_write`` (``begin_all``) and ends when its object becomes ready
(``finish``) or is discarded (``discard``: an abort, an expired write lease, its writer released,
a force delete, never an eviction). A discarded write stays here, by ``(writer, key)``, until its
writer lets go of it (``release``, from its ``finish_write``/``abort_write``, which answer
NOT_FOUND): a writer that names the key again after the key was stored afresh still releases
*its* slot, and only once. ``resolve`` turns what ``finish_write``/``abort_write`` name (keys of
one writer, or handles) into the writes to end.

All write leases have one duration and come from a monotonic clock, so the begin order is the
deadline order: the live writes are a plain dict in insertion order (cheaper to fill than an
``OrderedDict``), whose iteration skips the slots of finished writes until the dict next
compacts, so ``expired`` costs at most the dict's size. Not thread-safe: the L1 manager's
lock guards it.
"""

from __future__ import annotations

from typing import Callable, Hashable, Iterable, Iterator

from gpukv.l1.entry import Entry, Status


class WriteBook:
    """Live writes (deadline order, per writer) and discarded writes awaiting their writer."""

    __slots__ = ("_live", "_by_writer", "_discarded")

    def __init__(self) -> None:
        self._live: dict[Entry, None] = {}  # deadline order
        self._by_writer: dict[Hashable, dict[Entry, None]] = {}
        self._discarded: dict[tuple[Hashable, Hashable], list[Entry]] = {}  # oldest first

    def __len__(self) -> int:
        """Live (not discarded) writes."""
        return len(self._live)

    def begin_all(self, entries: Iterable[Entry | None], writer: Hashable) -> None:
        """New writes of ``writer`` (None items skipped), in deadline order, their deadlines the
        latest."""
        entries = dict.fromkeys(entries)
        entries.pop(None, None)
        if not entries:
            return
        self._live.update(entries)
        writes = self._by_writer.get(writer)
        if writes is None:
            self._by_writer[writer] = entries
        else:
            writes.update(entries)

    def finish(self, entry: Entry) -> None:
        """The live write ``entry`` became ready."""
        del self._live[entry]
        writes = self._by_writer[entry.writer]
        del writes[entry]
        if not writes:
            del self._by_writer[entry.writer]

    def discard(self, entry: Entry) -> None:
        """The live write ``entry`` was discarded; it waits here for its writer to let go."""
        self.finish(entry)
        self._discarded.setdefault((entry.writer, entry.key), []).append(entry)

    def release(self, entry: Entry) -> None:
        """The writer let go of the discarded write ``entry``."""
        pending = self._discarded[(entry.writer, entry.key)]
        pending.remove(entry)
        if not pending:
            del self._discarded[(entry.writer, entry.key)]

    def awaits_writer(self, entry: Entry) -> bool:
        """Whether ``entry`` is a discarded write its writer has not let go of yet."""
        return any(e is entry for e in self._discarded.get((entry.writer, entry.key), ()))

    def expired(self, now: float) -> list[Entry]:
        """The live writes whose deadline is ``<= now``, oldest first (left in place: the caller
        discards them)."""
        out = []
        for entry in self._live:
            if entry.write_deadline > now:
                break
            out.append(entry)
        return out

    def of_writer(self, writer: Hashable) -> list[Entry]:
        """``writer``'s live writes, oldest first."""
        return list(self._by_writer.get(writer, ()))

    @property
    def num_discarded(self) -> int:
        """Discarded writes whose writer still holds the pin."""
        return sum(len(pending) for pending in self._discarded.values())

    def resolve(self, items: Iterable, writer: Hashable, get: Callable[[Hashable], Entry | None],
                out: list[Status]) -> Iterator[Entry]:
        """The writes that ``items`` (handles, or keys of ``writer``'s writes, looked up with the
        object table's ``get``) name and whose pin is still held, one at a time: each item is
        resolved after the previous one was handled. Appends a status per item to ``out``: OK,
        NOT_FOUND for a write discarded meanwhile (yielded all the same: its pin is to be
        released; by key, ``writer``'s latest discarded write of it, even where the key is live
        again), WRONG_STATE or NOT_FOUND for anything else (not yielded)."""
        for item in items:
            if type(item) is Entry:
                if item.ready or (item.doomed and not self.awaits_writer(item)):
                    entry, status = None, Status.WRONG_STATE
                else:
                    entry, status = item, Status.NOT_FOUND if item.doomed else Status.OK
            else:
                entry = get(item)
                if entry is not None and not entry.ready and entry.writer == writer:
                    status = Status.OK
                else:
                    pending = self._discarded.get((writer, item))
                    status = Status.NOT_FOUND if pending or entry is None else Status.WRONG_STATE
                    entry = pending[-1] if pending else None
            out.append(status)
            if entry is not None:
                yield entry
