"""Random sequences of every L1 operation, from several owners on two device arenas, checked
against a plain model after every step.

The model knows exactly: states, per-(key, owner) share counts and lease deadlines, copy pins
(the write pin from reserve to finish/abort, and the reader pins it took itself), doomed objects
whose slot waits for its last unpin, temporary objects, and the counters. It does not choose slab
placement: the manager's offsets are recorded when handed out and then must never move, overlap
another held slot, or be handed out again while held; every writer fills its slot with its own
byte pattern, checked bit-exact on every held slot after every step. Evictions are read back
(an object that vanished during a write) and must be idle objects of the written device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gpukv.l1 import MAX_READERS, L1Manager, Status
from gpukv.l1.slab import SlabArena, aligned_bytes

OK, NF, NR, NW, WS, LK, OOM = (Status.OK, Status.NOT_FOUND, Status.NOT_READY, Status.NOT_WRITABLE,
                               Status.WRONG_STATE, Status.LOCKED, Status.OUT_OF_MEMORY)
KEYS = ["a", "b", "c", "d", "e", "f", "g", "h"]
OWNERS = [None, "r1", "r2"]
ARENAS = [(4096, 2048), (3072, 1024)]  # (capacity, slab_bytes) per device: slots of 256..2048 B
READ_LEASE, WRITE_LEASE = 10, 25

keys_st = st.lists(st.sampled_from(KEYS), max_size=4)
owner_st = st.sampled_from(OWNERS)
size_st = st.sampled_from([300, 1000, 1000, 2000, 5000])  # 5000: larger than either arena
extra_st = st.sampled_from([0, 0, 1, 3, 63, MAX_READERS - 1])


@dataclass(eq=False)
class Obj:
    serial: int
    key: str
    device: int
    size: int
    offset: int
    temporary: bool
    writer: object
    write_deadline: int
    handle: object = None  # the manager's Entry, once the model has seen it
    ready: bool = False
    doomed: bool = False
    freed: bool = False
    write_pin: bool = True
    pins: int = 0  # reader pins held by the model
    shares: dict = field(default_factory=dict)  # owner -> [count, lease deadline]

    @property
    def slot(self) -> int:
        return aligned_bytes(self.size)

    @property
    def readers(self) -> int:
        return sum(c for c, _ in self.shares.values())

    @property
    def idle(self) -> bool:
        return self.ready and not self.doomed and not self.shares and not self.pins

    def pattern(self) -> torch.Tensor:
        return ((torch.arange(self.size) * 7 + self.serial * 31 + 1) % 251).to(torch.uint8)


class L1Machine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0
        self.l1 = L1Manager(arenas=[SlabArena(c, slab_bytes=s) for c, s in ARENAS],
                            read_lease_s=READ_LEASE, write_lease_s=WRITE_LEASE, clock=lambda: self.now)
        self.live: dict[str, Obj] = {}  # not doomed, by key
        self.objs: list[Obj] = []  # every object ever made (handles may be stale)
        self.doomed_writes: dict[tuple, list[Obj]] = {}  # (writer, key) -> doomed, write pin held
        self.pinned: list[Obj] = []  # one element per reader pin the model holds
        self.counts = dict(evictions=[0, 0], expired_shares=0, expired_writes=0, deferred_frees=0)

    # -- the model's own transitions -------------------------------------------------------------
    def _doom(self, obj: Obj) -> None:
        if obj.doomed:
            return
        if not obj.ready:
            self.doomed_writes.setdefault((obj.writer, obj.key), []).append(obj)
        del self.live[obj.key]
        obj.doomed, obj.shares = True, {}
        if obj.pins or obj.write_pin:
            self.counts["deferred_frees"] += 1
            event("doomed while pinned: free deferred")
        else:
            obj.freed = True

    def _settle(self, obj: Obj) -> None:
        if obj.pins or obj.write_pin or obj.shares:
            return
        if obj.doomed:
            obj.freed = True
        elif obj.ready and obj.temporary:
            self._doom(obj)

    def _drop(self, obj: Obj, owner, count: int | None = None) -> int:
        held = obj.shares[owner][0]
        count = held if count is None else count
        if count < held:
            obj.shares[owner][0] = held - count
        else:
            del obj.shares[owner]
        self._settle(obj)
        return count

    def _release_write_pin(self, obj: Obj) -> None:
        if obj.doomed:
            self.doomed_writes[(obj.writer, obj.key)].remove(obj)
            if not self.doomed_writes[(obj.writer, obj.key)]:
                del self.doomed_writes[(obj.writer, obj.key)]
        obj.write_pin = False
        self._settle(obj)

    def _unpin(self, obj: Obj) -> None:
        obj.pins -= 1
        self._settle(obj)

    def _write_of(self, item, owner) -> tuple[Status, Obj | None]:
        """What finish_write/abort_write resolve an item (key or handle) to."""
        if not isinstance(item, str):
            obj = self._obj_of(item)
            if obj.ready or not obj.write_pin:
                return WS, None
            return (NF if obj.doomed else OK), obj
        obj = self.live.get(item)
        if obj is not None and not obj.ready and obj.writer == owner:
            return OK, obj
        doomed = self.doomed_writes.get((owner, item))
        if doomed:  # discarded meanwhile: NOT_FOUND, and its pin is released
            event("discarded write released by key" + (" (key live again)" if obj else ""))
            return NF, doomed[-1]
        return (WS if obj is not None else NF), None

    def _obj_of(self, handle) -> Obj:
        return next(o for o in self.objs if o.handle is handle)

    def _seen(self, obj: Obj, handle) -> None:
        assert handle is not None and (handle.device, handle.offset) == (obj.device, obj.offset)
        assert obj.handle in (None, handle)  # one object, one handle
        obj.handle = handle

    # -- writes ----------------------------------------------------------------------------------
    @rule(keys=keys_st, size=size_st, device=st.sampled_from([0, 1]), temporary=st.booleans(),
          owner=owner_st, with_handles=st.booleans())
    def reserve_write(self, keys, size, device, temporary, owner, with_handles):
        l1, slot = self.l1, aligned_bytes(size)
        idle_before = [o for o in self.live.values() if o.idle]
        live_before, evictions_before = set(self.live), l1.stats()["devices"][device]["evictions"]
        if with_handles:
            got, handles = l1.reserve_write_slots(keys, size, device=device, temporary=temporary, owner=owner)
        else:
            got, handles = l1.reserve_write(keys, size, device=device, temporary=temporary, owner=owner), None
        evicted = [o for o in idle_before if o.key not in l1]
        assert all(o.device == device for o in evicted)  # capacity and eviction per device
        assert l1.stats()["devices"][device]["evictions"] - evictions_before == len(evicted)
        self.counts["evictions"][device] += len(evicted)
        if evicted:
            event("write evicted " + ("a slab of another class" if evicted[0].slot != slot else "same class"))
        for obj in evicted:
            self._doom(obj)
        full = slot > ARENAS[device][0]
        for i, (key, status) in enumerate(zip(keys, got)):
            assert handles is None or (handles[i] is None) == (status is not OK)
            if full or status is OOM:
                assert status is OOM, (key, status)
                full = True
            elif status is NW:
                assert key in live_before or key in self.live, key
            else:
                assert status is OK and key not in self.live, (key, status)
                offset = handles[i].offset if handles else int(l1.locate([key])[1][0])
                obj = Obj(len(self.objs), key, device, size, offset, temporary, owner,
                          self.now + WRITE_LEASE)
                if handles:
                    self._seen(obj, handles[i])
                self.objs.append(obj)
                self.live[key] = obj
                l1.arena(device)[offset:offset + size] = obj.pattern()  # the writer's pack
        if OOM in got and slot <= ARENAS[device][0]:  # nothing was left to evict or allocate
            event("write OUT_OF_MEMORY")
            arena = l1.arenas[device]
            assert not any(o.idle and o.device == device and o.slot == slot for o in self.live.values())
            held = {o.offset: o for o in self.objs if o.device == device and not o.freed}
            for slab in arena.slabs():
                assert slab.slot_bytes == slot or not all(held[off].idle for off in slab.used_offsets())
            assert not arena.has_free_slot(slot) and all(e - s < slot for s, e in arena.free_ranges)

    @rule(keys=keys_st, size=size_st, device=st.sampled_from([0, 1]), temporary=st.booleans(),
          owner=owner_st)
    def put(self, keys, size, device, temporary, owner):
        """The common path: reserve then finish with the same owner."""
        self.reserve_write(keys, size, device, temporary, owner, False)
        self.finish_write(keys, owner, None, None)

    def _finish(self, items, owner, extra, reader, abort=False):
        want = []
        for item in items:
            status, obj = self._write_of(item, owner)
            want.append(status)
            if obj is None:
                continue
            if abort:
                self._doom(obj)
            elif not obj.doomed:
                obj.ready = True
                if extra is not None:
                    obj.shares[reader] = [extra + 1, self.now + READ_LEASE]
            self._release_write_pin(obj)
        return want

    @rule(keys=keys_st, owner=owner_st, extra=st.none() | extra_st, reader=owner_st)
    def finish_write(self, keys, owner, extra, reader):
        got = self.l1.finish_write(keys, owner=owner, extra_count=extra, reader=reader)
        assert got == self._finish(keys, owner, extra, reader)

    @rule(keys=keys_st, extra=extra_st, owner=owner_st)
    def finish_write_and_reserve_read(self, keys, extra, owner):
        got = self.l1.finish_write_and_reserve_read(keys, extra, owner=owner)
        assert got == self._finish(keys, owner, extra, owner)

    @rule(keys=keys_st, owner=owner_st)
    def abort_write(self, keys, owner):
        assert self.l1.abort_write(keys, owner=owner) == self._finish(keys, owner, None, None, abort=True)

    @precondition(lambda self: any(o.handle is not None for o in self.objs))
    @rule(data=st.data(), abort=st.booleans(), extra=st.none() | extra_st, reader=owner_st)
    def end_write_by_handle(self, data, abort, extra, reader):
        """Handles of any age: live writes, finished ones, discarded and freed ones."""
        handles = [o.handle for o in self.objs if o.handle is not None]
        items = data.draw(st.lists(st.sampled_from(handles), max_size=3))
        if abort:
            got = self.l1.abort_write(items, owner="ignored")
        else:
            got = self.l1.finish_write(items, owner="ignored", extra_count=extra, reader=reader)
        assert got == self._finish(items, "ignored", extra, reader, abort=abort)

    # -- shares ----------------------------------------------------------------------------------
    @rule(keys=keys_st, extra=extra_st, owner=owner_st, top_up=st.booleans())
    def reserve_read(self, keys, extra, owner, top_up):
        want = []
        for key in keys:
            obj = self.live.get(key)
            if obj is None or not obj.ready:
                want.append(NF if obj is None else NR)
                continue
            held = obj.shares.get(owner, [0])[0]
            new = max(held, extra + 1) if top_up else held + extra + 1
            if new > MAX_READERS:
                want.append(WS)
            else:
                obj.shares[owner] = [new, self.now + READ_LEASE]
                want.append(OK)
        assert self.l1.reserve_read(keys, extra, owner=owner, top_up=top_up) == want

    @rule(data=st.data(), extra=extra_st, owner=owner_st)
    def reserve_prefix(self, data, extra, owner):
        """The lookup's step: the prefix ready in every list, topped up to extra + 1 shares.
        Each list is mostly ready keys then any keys (one list per rank's key space)."""
        def ready(key):
            return key in self.live and self.live[key].ready

        heads = st.lists(st.sampled_from([k for k in KEYS if ready(k)] or KEYS), max_size=3)
        lists = [data.draw(heads) + data.draw(keys_st) for _ in range(data.draw(st.integers(1, 3)))]
        n = min(next((i for i, k in enumerate(keys) if not ready(k)), len(keys)) for keys in lists)
        for keys in lists:
            for key in keys[:n]:
                obj = self.live[key]
                obj.shares[owner] = [max(obj.shares.get(owner, [0])[0], extra + 1),
                                     self.now + READ_LEASE]
        assert self.l1.reserve_prefix(lists, extra, owner=owner) == n

    @rule(keys=keys_st, extra=st.sampled_from([0, 0, 1, 3, MAX_READERS - 1]), owner=owner_st)
    def finish_read(self, keys, extra, owner):
        want = []
        for key in keys:
            obj = self.live.get(key)
            if obj is None or obj.shares.get(owner, [0])[0] < extra + 1:
                want.append(NF if obj is None else WS)
            else:
                self._drop(obj, owner, extra + 1)
                want.append(OK)
        assert self.l1.finish_read(keys, extra, owner=owner) == want

    @precondition(lambda self: any(o.shares for o in self.live.values()))
    @rule(data=st.data())
    def finish_held(self, data):
        """Release part, all, or one more than all of a share some owner really holds."""
        held = [(o.key, w, c) for o in self.live.values() for w, (c, _) in o.shares.items()]
        key, owner, count = data.draw(st.sampled_from(held))
        self.finish_read([key], data.draw(st.integers(0, min(count, MAX_READERS - 1))), owner)

    # -- pins ------------------------------------------------------------------------------------
    @rule(keys=keys_st)
    def pin(self, keys):
        got, handles = self.l1.pin(keys)
        for key, status, handle in zip(keys, got, handles):
            obj = self.live.get(key)
            assert status is (NF if obj is None else OK if obj.ready else NR), (key, status)
            assert (handle is None) == (status is not OK)
            if status is OK:
                self._seen(obj, handle)
                obj.pins += 1
                self.pinned.append(obj)

    @precondition(lambda self: any(o.handle is not None for o in self.objs))
    @rule(data=st.data())
    def pin_handles(self, data):
        objs = data.draw(st.lists(st.sampled_from([o for o in self.objs if o.handle is not None]),
                                  max_size=3))
        want = []
        for obj in objs:
            want.append(NF if obj.doomed else NR if not obj.ready else OK)
            if want[-1] is OK:
                obj.pins += 1
                self.pinned.append(obj)
        assert self.l1.pin_handles([o.handle for o in objs]) == want

    @precondition(lambda self: self.pinned)
    @rule(data=st.data(), owner=owner_st, end_read=st.booleans())
    def unpin(self, data, owner, end_read):
        """``unpin``, or ``end_read`` for ``owner``, of some of the model's own pins."""
        picks = data.draw(st.lists(st.integers(0, len(self.pinned) - 1), unique=True, min_size=1))
        objs = [self.pinned[i] for i in picks]
        for i in sorted(picks, reverse=True):
            del self.pinned[i]
        handles = [o.handle for o in objs]
        if not end_read:
            self.l1.unpin(handles)
            for obj in objs:
                self._unpin(obj)
            return
        released = 0
        for obj in objs:
            if not obj.doomed and owner in obj.shares:
                released += self._drop(obj, owner, 1)
            self._unpin(obj)
        assert self.l1.end_read(handles, owner=owner) == released

    # -- delete, time, owners --------------------------------------------------------------------
    @rule(keys=keys_st, force=st.booleans())
    def delete(self, keys, force):
        want = []
        for key in keys:
            obj = self.live.get(key)
            want.append(NF if obj is None else OK if obj.idle or force else LK)
            if want[-1] is OK:
                self._doom(obj)
        assert self.l1.delete(keys, force=force) == want

    @rule()
    def clear(self):
        victims = [o for o in self.live.values() if o.idle]
        for obj in victims:
            self._doom(obj)
        assert self.l1.clear() == len(victims)

    @rule(dt=st.sampled_from([1, 4, 9, 30]))
    def advance(self, dt):
        self.now += dt

    @rule()
    def expire(self):
        released = 0
        for obj in list(self.live.values()):
            for owner in [w for w, (_, deadline) in obj.shares.items() if deadline <= self.now]:
                released += self._drop(obj, owner)
        for obj in [o for o in self.live.values() if not o.ready and o.write_deadline <= self.now]:
            self._doom(obj)
            self.counts["expired_writes"] += 1
        self.counts["expired_shares"] += released
        assert self.l1.expire() == released

    @rule(owner=owner_st, keys=st.none() | st.lists(st.sampled_from(KEYS), max_size=5))
    def release_owner(self, owner, keys):
        """Everything ``owner`` holds (its writes too), or its shares on some keys only."""
        released = 0
        for key in dict.fromkeys(KEYS if keys is None else keys):
            obj = self.live.get(key)
            if obj is not None and owner in obj.shares:
                released += self._drop(obj, owner)
        if keys is None:
            for obj in [o for o in self.live.values() if not o.ready and o.writer == owner]:
                self._doom(obj)
        assert self.l1.release_owner(owner, keys) == released

    # -- checks ----------------------------------------------------------------------------------
    @invariant()
    def matches_model(self):
        l1, live = self.l1, self.live
        for key in KEYS:
            obj = live.get(key)
            assert (key in l1) == (obj is not None and obj.ready)
            assert l1.read_count(key) == (obj.readers if obj else 0)
            assert l1.pin_count(key) == (obj.pins + obj.write_pin if obj else 0)
            assert l1.is_evictable(key) == (obj is not None and obj.idle)
            for owner in OWNERS:
                assert l1.held(key, owner) == (obj.shares.get(owner, [0])[0] if obj else 0)
        assert l1.prefix_hits(KEYS) == next((i for i, k in enumerate(KEYS)
                                             if k not in live or not live[k].ready), len(KEYS))
        stats = l1.stats()
        devices = stats.pop("devices")
        ready = [o for o in live.values() if o.ready]
        assert stats == dict(
            objects=len(live), ready=len(ready), writing=len(live) - len(ready),
            read_locked=sum(bool(o.shares) for o in live.values()),
            pinned=sum(bool(o.pins) for o in ready), shares=sum(o.readers for o in live.values()),
            used_bytes=sum(o.slot for o in self.objs if not o.freed),
            capacity_bytes=sum(c for c, _ in ARENAS), evictions=sum(self.counts["evictions"]),
            expired_shares=self.counts["expired_shares"], expired_writes=self.counts["expired_writes"],
            deferred_frees=self.counts["deferred_frees"], slabs_in_use=stats["slabs_in_use"],
            leases=sum(len(o.shares) for o in live.values()),
            owners=len({w for o in live.values() for w in o.shares}))
        for device, (capacity, _) in enumerate(ARENAS):
            held = sorted((o for o in self.objs if not o.freed and o.device == device),
                          key=lambda o: o.offset)
            assert devices[device] == dict(
                used_bytes=sum(o.slot for o in held), capacity_bytes=capacity,
                objects=sum(o.device == device for o in live.values()),
                read_locked=sum(o.device == device and bool(o.shares) for o in live.values()),
                shares=sum(o.readers for o in live.values() if o.device == device),
                evictions=self.counts["evictions"][device])
            # held slots: exactly the allocator's used slots, disjoint, and never moved
            used = {off for slab in l1.arenas[device].slabs() for off in slab.used_offsets()}
            assert used == {o.offset for o in held}
            for lo, hi in zip(held, held[1:]):
                assert lo.offset + lo.slot <= hi.offset, (lo, hi)
            arena = l1.arena(device)
            for obj in held:
                assert obj.handle is None or (obj.handle.device, obj.handle.offset) == (device, obj.offset)
                assert torch.equal(arena[obj.offset:obj.offset + obj.size], obj.pattern()), obj

    def teardown(self):
        l1 = self.l1
        l1.unpin([o.handle for o in self.pinned])
        l1.abort_write([o.handle for o in self.objs if o.write_pin and o.handle is not None])
        for owner in OWNERS:  # dooms the remaining writes; their writers still hold the pins
            l1.release_owner(owner)
        for obj in self.objs:
            if obj.write_pin and obj.handle is None:
                assert l1.abort_write([obj.key], owner=obj.writer) == [NF]
        l1.delete(KEYS, force=True)
        stats = l1.stats()
        assert stats["leases"] == stats["writing"] == stats["objects"] == 0
        assert l1.used_bytes == 0 and stats["slabs_in_use"] == 0
        assert [a.free_ranges for a in l1.arenas] == [[(0, c)] for c, _ in ARENAS]


L1Machine.TestCase.settings = settings(max_examples=400, stateful_step_count=60, deadline=None)
TestL1Properties = L1Machine.TestCase
