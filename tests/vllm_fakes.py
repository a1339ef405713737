"""A fake ``CacheClient`` for the vLLM connector's planning unit tests ONLY.

It follows the API the connector is written against (register / lookup_hashes / the data path's
begin_store_chunks, begin_retrieve_chunks, copy_layers, finish, abort / free_lookup_locks /
end_session / read_count; store / lookup / retrieve by tokens for tests) with the semantics it
relies on, in one process:

- keys: the real chain (``chunk_hashes`` from ``request_seed(salt, seed)``, extras mixed in);
  ``(model, kv_rank, hash)``, kv_rank = tp_rank for MHA, 0 for MLA;
- lookup: leading chunks present (MHA: on every rank ``0..tp_size-1``), shares topped up to the
  target (MLA ``tp_size`` per object, MHA 1 per rank shard) -- repeated lookups add nothing;
- retrieve: all or nothing; chunks whose slots are all ``-1`` are skipped and need no share; each
  used chunk needs one share of the request and gives it back; returns ``len(token_ids)`` or 0;
- free_lookup_locks(start, end): the shares of chunks lying entirely inside ``[start, end)``;
- store copies the token rows of full chunks not yet present (visible once finished; ``stored``
  lists the hashes each STORE_BEGIN named); the rows are the registered views'
  ``[block, ..., offset, ...]`` slices, as gpukv's generic descriptor reads them;
- copies are two-step and layer by layer like ``WorkerCopies`` (:class:`FakeCopy`);
- lookup with ``loadable``: 0 unless instances of the model are registered for every TP rank by
  the caller's group (:class:`GroupView`: one engine's processes);
- :meth:`FakeClient.restart`: the server restarts (a new pid; registrations, objects and shares
  gone): store and retrieve then name an unknown instance, as the server does.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from gpukv.engine.keys import chunk_hashes, request_seed


@dataclass
class FakeCopy:
    """A begun store or retrieve of :class:`FakeClient` (``WorkerCopies.Copy``'s fields the
    connector reads)."""

    op: str
    instance_id: str
    request_id: str | None
    chunks: list[tuple[int, tuple]]  # (chunk index, key) to copy
    slots: list[int]
    num_layers: int
    chunk_bytes: int = 64
    grant: Any = True  # None: nothing to copy
    tokens: int = 0
    layers_queued: int = 0
    finished: bool = False
    rows: dict = field(default_factory=dict)  # store: key -> per-layer rows copied so far

    @property
    def nbytes(self) -> int:
        return len(self.chunks) * self.chunk_bytes


class _Done:
    def wait(self) -> None:
        pass

    def done(self) -> bool:
        return True


class FakeClient:
    def __init__(self, chunk_size: int = 32) -> None:
        self.chunk_size = chunk_size
        self.instances: dict[str, dict[str, Any]] = {}
        self.objects: dict[tuple[str, int, bytes], list[torch.Tensor]] = {}  # per layer [chunk, row...]
        self.shares: Counter = Counter()  # (request_id, key) -> shares
        self.chunk_index: dict[tuple, int] = {}  # (request_id, key) -> chunk index in its lookup
        self.calls: Counter = Counter()
        self.fail_next_retrieves = 0
        self.stored: list[list[bytes]] = []  # the hashes each STORE_BEGIN named
        self.server_info = {"pid": 1000, "chunk_size": chunk_size, "salt": ""}

    def restart(self, *, chunk_size: int | None = None) -> None:
        """The server restarts empty (another process, another pid)."""
        self.instances.clear()
        self.objects.clear()
        self.shares.clear()
        self.server_info = dict(self.server_info, pid=self.server_info["pid"] + 1,
                                chunk_size=chunk_size or self.chunk_size)

    def ping(self, *, timeout_s=None) -> dict:
        self.calls["ping"] += 1
        return dict(self.server_info)

    def _instance(self, instance_id) -> dict[str, Any]:
        inst = self.instances.get(instance_id)
        if inst is None:
            raise ValueError(f"unknown instance {instance_id!r} for this client: REGISTER it first")
        return inst

    # -- keys ---------------------------------------------------------------------------------
    def hashes(self, token_ids, seed: bytes = b"", extras=None) -> list[bytes]:
        return chunk_hashes(np.asarray(token_ids, dtype=np.int64), self.chunk_size,
                            seed=request_seed(self.server_info["salt"], seed), extras=extras)

    def _kind(self, model: str) -> str:
        kinds = {i["kind"] for i in self.instances.values() if i["model"] == model}
        assert len(kinds) == 1, f"model {model!r} registered with kinds {kinds}"
        return kinds.pop()

    @staticmethod
    def _rows(view: torch.Tensor, dims: str, slot: int, block_size: int) -> torch.Tensor:
        b, off = divmod(slot, block_size)
        return view[b, off] if dims == "NB,BS,D" else view[b, :, :, off]  # "NB,H,2,BS,D"

    # -- API ----------------------------------------------------------------------------------
    def register(self, instance_id, model, kv_caches, dims, *, kind="mha", tp_rank=0, tp_size=1,
                 group=None) -> None:
        self.calls["register"] += 1
        views = list(kv_caches.values()) if isinstance(kv_caches, dict) else list(kv_caches)
        block_size = views[0].shape[1] if dims == "NB,BS,D" else views[0].shape[3]
        if instance_id in self.instances:
            raise ValueError(f"instance {instance_id!r} is already registered")
        self.instances[instance_id] = dict(model=model, views=views, dims=dims, kind=kind, tp_rank=tp_rank,
                                           tp_size=tp_size, kv_rank=tp_rank if kind == "mha" else 0,
                                           block_size=block_size, group=group)

    def unregister(self, instance_id) -> None:
        del self.instances[instance_id]

    # -- the data path (WorkerCopies' chunk-level API) -----------------------------------------
    def begin_store_chunks(self, instance_id, hashes, slot_mapping) -> FakeCopy:
        self.calls["store"] += 1
        inst, cs = self._instance(instance_id), self.chunk_size
        self.stored.append(list(hashes))
        slots = slot_mapping.tolist()
        todo = [(i, (inst["model"], inst["kv_rank"], h)) for i, h in enumerate(hashes)
                if (inst["model"], inst["kv_rank"], h) not in self.objects
                and all(s >= 0 for s in slots[i * cs:(i + 1) * cs])]
        copy = FakeCopy("store", instance_id, None, todo, slots, len(inst["views"]))
        if not todo:
            copy.grant = None
        return copy

    def begin_retrieve_chunks(self, instance_id, hashes, slot_mapping, *, request_id) -> FakeCopy:
        self.calls["retrieve"] += 1
        inst, cs = self._instance(instance_id), self.chunk_size
        slots = slot_mapping.tolist()
        used = []
        missing = FakeCopy("retrieve", instance_id, request_id, [], slots, 0, grant=None, tokens=0)
        for i, h in enumerate(hashes):
            if all(s < 0 for s in slots[i * cs:(i + 1) * cs]):
                continue
            key = (inst["model"], inst["kv_rank"], h)
            if key not in self.objects or self.shares[(request_id, key)] < 1:
                return missing
            used.append((i, key))
        if self.fail_next_retrieves:
            self.fail_next_retrieves -= 1
            return missing
        copy = FakeCopy("retrieve", instance_id, request_id, used, slots, len(inst["views"]),
                        tokens=len(hashes) * cs)
        if not used:
            copy.grant = None
        return copy

    def copy_layers(self, copy: FakeCopy, stop=None, **_) -> _Done:
        assert not copy.finished and copy.grant is not None
        stop = copy.num_layers if stop is None else stop
        assert copy.layers_queued < stop <= copy.num_layers
        inst, cs = self._instance(copy.instance_id), self.chunk_size
        for layer in range(copy.layers_queued, stop):
            view = inst["views"][layer]
            for i, key in copy.chunks:
                span = copy.slots[i * cs:(i + 1) * cs]
                if copy.op == "store":
                    copy.rows.setdefault(key, [None] * copy.num_layers)[layer] = torch.stack(
                        [self._rows(view, inst["dims"], s, inst["block_size"]).clone() for s in span])
                else:
                    for j, s in enumerate(span):
                        if s >= 0:
                            self._rows(view, inst["dims"], s, inst["block_size"]).copy_(self.objects[key][layer][j])
        copy.layers_queued = stop
        return _Done()

    def finish(self, copy: FakeCopy) -> int:
        assert not copy.finished
        copy.finished = True
        if copy.grant is None:
            return copy.tokens
        assert copy.layers_queued == copy.num_layers
        if copy.op == "store":
            for _, key in copy.chunks:
                self.objects.setdefault(key, copy.rows[key])
            return len(copy.chunks) * self.chunk_size
        self._release(copy)
        return copy.tokens

    def abort(self, copy: FakeCopy) -> None:
        assert not copy.finished
        copy.finished = True
        if copy.grant is not None and copy.op == "retrieve":
            self._release(copy)

    def _release(self, copy: FakeCopy) -> None:
        for _, key in copy.chunks:
            self.shares[(copy.request_id, key)] -= 1

    # -- by tokens (tests) ----------------------------------------------------------------------
    def store(self, instance_id, token_ids, slot_mapping, *, seed=b"", extras=None) -> int:
        hashes = self.hashes(token_ids, seed, extras)
        copy = self.begin_store_chunks(instance_id, hashes, slot_mapping[:len(hashes) * self.chunk_size])
        if copy.grant is not None:
            self.copy_layers(copy)
        return self.finish(copy) if copy.grant is not None else 0

    def retrieve(self, instance_id, token_ids, slot_mapping, *, request_id, seed=b"", extras=None) -> int:
        hashes = self.hashes(token_ids, seed, extras)
        copy = self.begin_retrieve_chunks(instance_id, hashes, slot_mapping, request_id=request_id)
        if copy.grant is not None:
            self.copy_layers(copy)
        return self.finish(copy)

    def lookup(self, model, token_ids, *, request_id, tp_size=1, num_readers=None, seed=b"", extras=None,
               loadable=False, group=None) -> int:
        return self.lookup_hashes(model, self.hashes(token_ids, seed, extras), request_id=request_id,
                                  tp_size=tp_size, num_readers=num_readers, loadable=loadable, group=group)

    def lookup_hashes(self, model, hashes, *, request_id, tp_size=1, num_readers=None, loadable=False,
                      group=None) -> int:
        self.calls["lookup"] += 1
        if loadable:
            ranks = {i["tp_rank"] for i in self.instances.values()
                     if i["model"] == model and i["tp_size"] == tp_size and i["group"] == group}
            if len(ranks) < tp_size:
                return 0
        elif not any(i["model"] == model for i in self.instances.values()):
            raise ValueError(f"unknown model {model!r}: no instance registered it")
        kind = self._kind(model)
        hit = 0
        for i, h in enumerate(hashes):
            keys = [(model, 0, h)] if kind == "mla" else [(model, r, h) for r in range(tp_size)]
            if not all(k in self.objects for k in keys):
                break
            target = (num_readers or tp_size) if kind == "mla" else 1
            for k in keys:
                self.shares[(request_id, k)] = max(self.shares[(request_id, k)], target)
                self.chunk_index[(request_id, k)] = i
            hit += self.chunk_size
        return hit

    def free_lookup_locks(self, request_id, *, start_token=0, end_token=None) -> int:
        self.calls["free_lookup_locks"] += 1
        freed = 0
        for (rid, key), n in list(self.shares.items()):
            if rid != request_id or n == 0:
                continue
            idx = self.chunk_index[(rid, key)]
            lo, hi = idx * self.chunk_size, (idx + 1) * self.chunk_size
            if lo >= start_token and (end_token is None or hi <= end_token):
                freed += n
                self.shares[(rid, key)] = 0
        return freed

    def end_session(self, request_id) -> None:
        self.calls["end_session"] += 1
        for k in [k for k in self.shares if k[0] == request_id]:
            self.shares[k] = 0

    def read_count(self, model, token_ids, *, kv_rank=0, seed=b"") -> list[int]:
        return [sum(n for (_, k), n in self.shares.items() if k == (model, kv_rank, h))
                for h in self.hashes(token_ids, seed, None)]

    # -- test helpers -------------------------------------------------------------------------
    def total_shares(self) -> int:
        return sum(self.shares.values())


class GroupView:
    """One engine's view of a :class:`FakeClient`: its registrations and lookups carry the
    engine's group, as the sessions of one engine's processes do on the real server."""

    def __init__(self, fake: FakeClient, group: str) -> None:
        self.fake, self.group = fake, group

    def __getattr__(self, name: str):
        return getattr(self.fake, name)

    def register(self, *args, **kwargs) -> None:
        return self.fake.register(*args, group=self.group, **kwargs)

    def lookup(self, *args, **kwargs) -> int:
        return self.fake.lookup(*args, group=self.group, **kwargs)

    def lookup_hashes(self, *args, **kwargs) -> int:
        return self.fake.lookup_hashes(*args, group=self.group, **kwargs)
