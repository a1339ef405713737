"""Client sessions of a ``gpukv serve`` process, and what each request does to the engine.

Every request names its client session. The shares a LOOKUP takes are owned by
``(session, request_id)`` in the engine, so FREE_LOOKUP_LOCKS and END_SESSION release only the
calling client's own shares. A RETRIEVE releases one share of the caller's own lookup of that
request if it made one (every rank looks up for itself), else of the first client that looked it
up (a scheduler looked up for the whole TP group). Instances are namespaced per session the same
way. A session silent for ``worker_timeout_s`` is reaped: its requests end (their shares are
released), its instances are unregistered (unfinished writes discarded, mappings dropped) and
the shm files of dead workers are unlinked.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Hashable

import numpy as np
import torch

from gpukv.engine.keys import chunk_hashes
from gpukv.frontend.protocol import (PROTOCOL_VERSION, EndSession, Flush, FreeLookupLocks, Lookup, Ping,
                            ReadCounts, Register, Retrieve, Stats, Store, Unregister)
from gpukv.frontend.shm import SHM_DIR, remove_stale
from gpukv.frontend.worker_memory import WorkerMemory

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Session:
    last_seen: float
    instances: dict = field(default_factory=dict)  # client instance id -> WorkerMemory
    requests: set = field(default_factory=set)  # request ids whose LOOKUP this session sent


class Sessions:
    """Client sessions and the engine calls of every request type (thread-safe).

    Engine ids are namespaced: instance ``(session, instance_id)``, request owner
    ``(lookup session, request_id)``.
    """

    def __init__(self, engine, *, worker_timeout_s: float = 30.0,
                 shm_dir: str | os.PathLike = SHM_DIR) -> None:
        self.engine = engine
        self.worker_timeout_s = worker_timeout_s
        self.shm_dir = Path(shm_dir)
        self._lock = threading.Lock()
        self._sessions: dict[str, _Session] = {}
        self._lookups: dict[Hashable, list[str]] = {}  # request id -> sessions that looked it up
        self._seed = engine.config.salt.encode()
        self._handlers = {Register: self._register, Unregister: self._unregister,
                          Store: self._store, Lookup: self._lookup, Retrieve: self._retrieve,
                          FreeLookupLocks: self._free, EndSession: self._end, Ping: self._ping,
                          Stats: self._stats, Flush: self._flush}

    def touch(self, session: str) -> None:
        """Mark ``session`` alive now (a new id starts a new, empty session)."""
        with self._lock:
            entry = self._sessions.get(session)
            if entry is None:
                self._sessions[session] = _Session(time.monotonic())
                log.debug("new client session %s", session)
            else:
                entry.last_seen = time.monotonic()

    def handle(self, session: str, body) -> Any:
        """Run one decoded request body for ``session``; its return value is the reply value.
        Raises ``ValueError`` naming the problem for bad input (the server turns it into an
        error reply)."""
        return self._handlers[type(body)](session, body)

    def _session(self, session: str) -> _Session:
        entry = self._sessions.get(session)
        if entry is None:
            raise ValueError(f"session {session!r} was reaped (no ping for "
                             f"{self.worker_timeout_s} s): register again")
        return entry

    def _memory(self, session: str, instance_id: Hashable) -> WorkerMemory:
        with self._lock:
            mem = self._session(session).instances.get(instance_id)
        if mem is None:
            raise ValueError(f"unknown instance {instance_id!r} for this client: REGISTER it first")
        return mem

    # ---- handlers ----------------------------------------------------------------------------
    def _register(self, session: str, body: Register) -> None:
        with self._lock:
            if body.instance_id in self._session(session).instances:
                raise ValueError(f"instance {body.instance_id!r} is already registered")
        mem = WorkerMemory(body.tensors, shm_dir=self.shm_dir)
        try:
            tensors = mem.tensors
            layers = (tensors[: len(tensors) // 2], tensors[len(tensors) // 2:]) \
                if body.kv_pair else tensors
            self.engine.register((session, body.instance_id), body.model, layers, body.dims,
                                 kind=body.kind, tp_rank=body.tp_rank, tp_size=body.tp_size)
        except BaseException:
            mem.close()
            raise
        with self._lock:
            entry = self._sessions.get(session)
            if entry is not None:
                entry.instances[body.instance_id] = mem
                return
        self.engine.unregister((session, body.instance_id))  # reaped meanwhile
        mem.close()
        raise ValueError(f"session {session!r} was reaped during REGISTER")

    def _unregister(self, session: str, body: Unregister) -> None:
        mem = self._memory(session, body.instance_id)
        self.engine.unregister((session, body.instance_id))
        with self._lock:
            self._session(session).instances.pop(body.instance_id, None)
        mem.close()

    def _store(self, session: str, body: Store) -> int:
        self._memory(session, body.instance_id)  # unknown instance -> ValueError naming it
        return self.engine.store((session, body.instance_id), _tokens(body.tokens), _slots(body.slots))

    def _lookup(self, session: str, body: Lookup) -> int:
        hashes = body.hashes if body.hashes is not None else chunk_hashes(
            _tokens(body.tokens), self.engine.config.chunk_size, seed=self._seed)
        hit = self.engine.lookup_hashes(body.model, hashes, request_id=(session, body.request_id),
                                        tp_size=body.tp_size, num_readers=body.num_readers)
        with self._lock:
            sessions = self._lookups.setdefault(body.request_id, [])
            if session not in sessions:
                sessions.append(session)
            self._session(session).requests.add(body.request_id)
        return hit

    def _retrieve(self, session: str, body: Retrieve) -> int:
        self._memory(session, body.instance_id)
        with self._lock:
            sessions = self._lookups.get(body.request_id)
            if not sessions:
                raise ValueError(f"unknown request {body.request_id!r}: LOOKUP it first")
            owner = session if session in sessions else sessions[0]
        return self.engine.retrieve((session, body.instance_id), _tokens(body.tokens),
                                    _slots(body.slots), request_id=(owner, body.request_id))

    def _free(self, session: str, body: FreeLookupLocks) -> int:
        return self.engine.free_lookup_locks((session, body.request_id))

    def _end(self, session: str, body: EndSession) -> None:
        self.engine.end_session((session, body.request_id))
        with self._lock:
            self._forget(session, body.request_id)
            self._session(session).requests.discard(body.request_id)

    def _forget(self, session: str, request_id: Hashable) -> None:
        sessions = self._lookups.get(request_id)
        if sessions is not None and session in sessions:
            sessions.remove(session)
            if not sessions:
                del self._lookups[request_id]

    def _ping(self, session: str, body: Ping) -> dict:
        cfg = self.engine.config
        return dict(version=PROTOCOL_VERSION, chunk_size=cfg.chunk_size, salt=cfg.salt,
                    device=str(self.engine.device), worker_timeout_s=self.worker_timeout_s,
                    pid=os.getpid())

    def _stats(self, session: str, body: Stats) -> dict:
        out = self.engine.stats()
        with self._lock:
            out["server"] = dict(sessions=len(self._sessions), requests=len(self._lookups),
                                 instances=sum(len(s.instances) for s in self._sessions.values()))
        if body.query is not None:
            out["query"] = self._read_counts(body.query)
        return out

    def _read_counts(self, q: ReadCounts) -> dict:
        hashes = q.hashes if q.hashes is not None else chunk_hashes(
            _tokens(q.tokens), self.engine.config.chunk_size, seed=self._seed)
        return self.engine.object_states(q.model, hashes, kv_rank=q.kv_rank)

    def _flush(self, session: str, body: Flush) -> bool:
        return self.engine.flush(body.timeout_s)

    # ---- reaping -----------------------------------------------------------------------------
    def reap_idle(self) -> list[str]:
        """Reap every session silent for longer than the worker timeout; returns their ids."""
        cutoff = time.monotonic() - self.worker_timeout_s
        with self._lock:
            idle = [sid for sid, s in self._sessions.items() if s.last_seen < cutoff]
        for sid in idle:
            self.reap(sid)
        return idle

    def reap(self, session: str) -> int:
        """Release a session's shares, unregister its instances; returns the shares released."""
        with self._lock:
            entry = self._sessions.pop(session, None)
            if entry is None:
                return 0
            for request_id in entry.requests:
                self._forget(session, request_id)
        released = 0
        for request_id in entry.requests:
            released += self.engine.free_lookup_locks((session, request_id))
            self.engine.end_session((session, request_id))
        for instance_id, mem in entry.instances.items():
            self.engine.unregister((session, instance_id))
            mem.close()
        stale = remove_stale(self.shm_dir) if entry.instances else []
        log.info("reaped client %s: %d shares of %d requests released, %d instances dropped, "
                 "%d shm files removed", session, released, len(entry.requests),
                 len(entry.instances), len(stale))
        return released

    def close(self) -> None:
        with self._lock:
            sessions = list(self._sessions)
        for sid in sessions:
            self.reap(sid)


def _tokens(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i8")


def _slots(data: bytes) -> torch.Tensor:
    """The slot mapping (the engine checks it against the cache before it takes any share)."""
    return torch.from_numpy(np.frombuffer(data, dtype="<i8").copy())
