"""Random sequences of every L1 operation from several owners, checked against a plain model.

The model knows states, per-owner share counts, lease deadlines and temporary flags exactly; it
does not model slab placement, so where a write evicts it only checks that every vanished object
was evictable (ready, unlocked) and that an OUT_OF_MEMORY left no evictable object of that class.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gpukv.l1 import MAX_READERS, L1Manager, Status
from gpukv.l1.slab import aligned_bytes

KEYS = ["a", "b", "c", "d", "e", "f", "g"]
OWNERS = [None, "r1", "r2"]
SIZES = [300, 1000]  # slots of 512 and 1024 bytes
READ_LEASE, WRITE_LEASE = 10, 25

keys_st = st.lists(st.sampled_from(KEYS), min_size=0, max_size=4)
owner_st = st.sampled_from(OWNERS)
extra_st = st.sampled_from([0, 0, 1, 3, 63, MAX_READERS - 1])
release_st = st.sampled_from([0, 0, 0, 1, 3, MAX_READERS - 1])


@dataclass
class Obj:
    size: int
    temporary: bool
    writer: object
    write_deadline: int
    ready: bool = False
    shares: dict = field(default_factory=dict)  # owner -> [count, deadline]

    @property
    def readers(self) -> int:
        return sum(c for c, _ in self.shares.values())


class L1Machine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0
        self.l1 = L1Manager(4096, slab_bytes=2048, read_lease_s=READ_LEASE,
                            write_lease_s=WRITE_LEASE, clock=lambda: self.now)
        self.model: dict[str, Obj] = {}

    def _free_if_temporary_unlocked(self, key: str) -> None:
        obj = self.model[key]
        if obj.temporary and obj.ready and not obj.shares:
            del self.model[key]

    # -- writes ----------------------------------------------------------------------------------
    @rule(keys=keys_st, size=st.sampled_from(SIZES), temporary=st.booleans(), owner=owner_st)
    def reserve_write(self, keys, size, temporary, owner):
        evictable_before = {k for k, o in self.model.items() if o.ready and not o.shares}
        got = self.l1.reserve_write(keys, size, temporary=temporary, owner=owner)
        full = False
        for key, status in zip(keys, got):
            if full:
                assert status is Status.OUT_OF_MEMORY
                continue
            old = self.model.get(key)
            if status is Status.NOT_WRITABLE:
                assert old is not None, key
                continue
            # A key the model holds gets OK or OUT_OF_MEMORY only if an earlier key of this batch
            # evicted it, so it must have been evictable.
            assert old is None or key in evictable_before, key
            assert status in (Status.OK, Status.OUT_OF_MEMORY), (key, status)
            full = status is Status.OUT_OF_MEMORY
            self.model.pop(key, None)
            if status is Status.OK:
                self.model[key] = Obj(size, temporary, owner, self.now + WRITE_LEASE)
        for key in list(self.model):
            if key not in self.l1._objects:  # evicted: must have been ready and unlocked
                assert key in evictable_before, key
                del self.model[key]
        if full:  # same-class eviction comes first, so no evictable object of that class is left
            assert not any(o.ready and not o.shares and aligned_bytes(o.size) == aligned_bytes(size)
                           for o in self.model.values())

    @rule(keys=keys_st, size=st.sampled_from(SIZES), temporary=st.booleans(), owner=owner_st)
    def put(self, keys, size, temporary, owner):
        """The common path: reserve then finish with the same owner."""
        self.reserve_write(keys, size, temporary, owner)
        self.finish_write(keys, owner)

    def _end_write(self, key, owner):
        obj = self.model.get(key)
        if obj is None:
            return Status.NOT_FOUND, None
        if obj.ready or obj.writer != owner:
            return Status.WRONG_STATE, None
        return Status.OK, obj

    @rule(keys=keys_st, owner=owner_st)
    def finish_write(self, keys, owner):
        want = []
        for key in keys:
            status, obj = self._end_write(key, owner)
            want.append(status)
            if obj is not None:
                obj.ready = True
        assert self.l1.finish_write(keys, owner=owner) == want

    @rule(keys=keys_st, owner=owner_st)
    def abort_write(self, keys, owner):
        want = []
        for key in keys:
            status, obj = self._end_write(key, owner)
            want.append(status)
            if obj is not None:
                del self.model[key]
        assert self.l1.abort_write(keys, owner=owner) == want

    @rule(keys=keys_st, extra=extra_st, owner=owner_st)
    def finish_write_and_reserve_read(self, keys, extra, owner):
        want = []
        for key in keys:
            status, obj = self._end_write(key, owner)
            want.append(status)
            if obj is not None:
                obj.ready = True
                obj.shares[owner] = [extra + 1, self.now + READ_LEASE]
        assert self.l1.finish_write_and_reserve_read(keys, extra, owner=owner) == want

    # -- reads -----------------------------------------------------------------------------------
    @rule(keys=keys_st, extra=extra_st, owner=owner_st)
    def reserve_read(self, keys, extra, owner):
        want = []
        for key in keys:
            obj = self.model.get(key)
            if obj is None:
                want.append(Status.NOT_FOUND)
            elif not obj.ready:
                want.append(Status.NOT_READY)
            elif obj.shares.get(owner, [0])[0] + extra + 1 > MAX_READERS:
                want.append(Status.WRONG_STATE)
            else:
                count = obj.shares.get(owner, [0])[0]
                obj.shares[owner] = [count + extra + 1, self.now + READ_LEASE]
                want.append(Status.OK)
        assert self.l1.reserve_read(keys, extra, owner=owner) == want

    @rule(keys=keys_st, extra=release_st, owner=owner_st)
    def finish_read(self, keys, extra, owner):
        want = []
        for key in keys:
            obj = self.model.get(key)
            if obj is None:
                want.append(Status.NOT_FOUND)
            elif obj.shares.get(owner, [0])[0] < extra + 1:
                want.append(Status.WRONG_STATE)
            else:
                obj.shares[owner][0] -= extra + 1
                if obj.shares[owner][0] == 0:
                    del obj.shares[owner]
                self._free_if_temporary_unlocked(key)
                want.append(Status.OK)
        assert self.l1.finish_read(keys, extra, owner=owner) == want

    @precondition(lambda self: any(o.shares for o in self.model.values()))
    @rule(data=st.data())
    def finish_held(self, data):
        """Release part, all, or one more than all of a share some owner really holds."""
        held = [(k, owner, c) for k, o in self.model.items() for owner, (c, _) in o.shares.items()]
        key, owner, count = data.draw(st.sampled_from(held))
        extra = data.draw(st.integers(0, min(count, MAX_READERS - 1)))
        self.finish_read([key], extra, owner)

    # -- delete, time, owners --------------------------------------------------------------------
    @rule(keys=keys_st, force=st.booleans())
    def delete(self, keys, force):
        want = []
        for key in keys:
            obj = self.model.get(key)
            if obj is None:
                want.append(Status.NOT_FOUND)
            elif (obj.shares or not obj.ready) and not force:
                want.append(Status.LOCKED)
            else:
                del self.model[key]
                want.append(Status.OK)
        assert self.l1.delete(keys, force=force) == want

    @rule()
    def clear(self):
        victims = [k for k, o in self.model.items() if o.ready and not o.shares]
        for key in victims:
            del self.model[key]
        assert self.l1.clear() == len(victims)

    @rule(dt=st.sampled_from([1, 4, 9, 30]))
    def advance(self, dt):
        self.now += dt

    @rule()
    def expire(self):
        released = 0
        for key in list(self.model):
            obj = self.model[key]
            if not obj.ready:
                if obj.write_deadline <= self.now:
                    del self.model[key]
                continue
            expired = [o for o, (_, deadline) in obj.shares.items() if deadline <= self.now]
            for owner in expired:
                released += obj.shares.pop(owner)[0]
            if expired:
                self._free_if_temporary_unlocked(key)
        assert self.l1.expire() == released

    @rule(owner=owner_st)
    def release_owner(self, owner):
        released = 0
        for key in list(self.model):
            obj = self.model[key]
            if not obj.ready and obj.writer == owner:
                del self.model[key]
            elif owner in obj.shares:
                released += obj.shares.pop(owner)[0]
                self._free_if_temporary_unlocked(key)
        assert self.l1.release_owner(owner) == released

    # -- checks ----------------------------------------------------------------------------------
    @invariant()
    def matches_model(self):
        l1, model = self.l1, self.model
        assert set(l1._objects) == set(model)
        for key in KEYS:
            obj = model.get(key)
            assert (key in l1) == (obj is not None and obj.ready)
            assert l1.read_count(key) == (obj.readers if obj else 0) >= 0
            assert l1.is_evictable(key) == (obj is not None and obj.ready and not obj.shares)
            for owner in OWNERS:
                assert l1.held(key, owner) == (obj.shares.get(owner, [0])[0] if obj else 0)
        assert len(l1) == sum(o.ready for o in model.values())
        assert l1.used_bytes == sum(aligned_bytes(o.size) for o in model.values())
        stats = l1.stats()
        assert stats["writing"] == sum(not o.ready for o in model.values())
        assert stats["read_locked"] == sum(bool(o.shares) for o in model.values())
        assert stats["leases"] == sum(len(o.shares) for o in model.values())

    def teardown(self):
        for owner in OWNERS:
            self.l1.release_owner(owner)
        assert self.l1.stats()["leases"] == 0 and self.l1.stats()["writing"] == 0
        self.l1.delete(list(self.model), force=True)
        assert self.l1.used_bytes == 0 and len(self.l1) == 0 and self.l1.stats()["slabs_in_use"] == 0
        assert self.l1.arenas[0].free_ranges == [(0, 4096)]


L1Machine.TestCase.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
TestL1Properties = L1Machine.TestCase
