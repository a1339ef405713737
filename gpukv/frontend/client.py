"""``CacheClient``: the :class:`gpukv.CacheEngine` API, with the books kept by ``gpukv serve``.

A worker switches between embedded and server mode by construction alone::

    cache = CacheEngine(EngineConfig(...))                    # embedded
    cache = CacheClient("ipc:///run/user/1000/gpukv.sock")    # one server for the whole machine

Same methods, arguments and return values. The worker registers its engine's OWN KV tensors
(list, tuple or dict name -> tensor; cross-layer views included); the server answers with its
arenas' handles, which this client maps once. ``store`` asks for write slots (STORE_BEGIN), packs
its pages into them here, in this process, then commits; ``retrieve`` pins the request's objects
(RETRIEVE_BEGIN), unpacks them here and releases (RETRIEVE_END): two round trips each, and only
metadata crosses the socket.

The data path is :class:`gpukv.engine.copies.WorkerCopies`, the embedded engine's too, over
:class:`gpukv.frontend.remote_books.RemoteBooks`: on CUDA the copy is queued on this worker's
current stream after its own forward work, and the commit (or the end of a retrieve) is sent only
once the copy's fence has completed, so the server never hands out a slot a copy still touches.

Groups: requests are visible to the sessions of one group. The processes of one engine (its
scheduler and its workers) pass the same ``group`` secret; by default each client is a group of
its own.

Threads: any thread may call any method (the transport is :class:`gpukv.frontend.channel.Channel`:
pooled sockets, a timeout on every call, a dead server raises :class:`ServerUnavailable`, never
hangs). A daemon thread PINGs every ``worker_timeout / 4`` s so the server sees this process alive
while it idles.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any, Hashable

from gpukv.engine.chunks import token_range
from gpukv.engine.copies import WorkerCopies
from gpukv.engine.hit_sources import LookupHit, parse_runs
from gpukv.engine.keys import TokenIds
from gpukv.engine.worker_path import WorkerPath
from gpukv.frontend import protocol as p
from gpukv.frontend.channel import Channel, ServerError, ServerUnavailable
from gpukv.frontend.peer import server_uid
from gpukv.frontend.remote_books import RemoteBooks
from gpukv.ops.client_metrics import ClientMetrics

__all__ = ["CacheClient", "ServerError", "ServerUnavailable"]


class CacheClient(WorkerPath):
    """A connection to a ``gpukv serve`` process at ``address`` (``ipc://...`` or ``tcp://...``;
    default: :func:`gpukv.frontend.protocol.default_address`, the server's default).

    ``timeout_s`` bounds every call; ``ping_interval_s`` defaults to a quarter of the server's
    worker timeout (0 disables pings); ``group``: see the module docstring.
    """

    def __init__(self, address: str | None = None, *, group: str | None = None,
                 timeout_s: float = 30.0, connect_timeout_s: float = 10.0,
                 ping_interval_s: float | None = None, backend: str | None = None) -> None:
        address = p.default_address() if address is None else address
        if not isinstance(address, str) or not address.startswith(("ipc://", "tcp://")):
            raise ValueError(f"address must be ipc://<path> or tcp://<host>:<port>, got {address!r}")
        if timeout_s <= 0 or connect_timeout_s <= 0:
            raise ValueError(f"timeouts must be positive, got {timeout_s!r}, {connect_timeout_s!r}")
        if group is not None and (not isinstance(group, str) or not 16 <= len(group) <= 128):
            raise ValueError("group must be a secret str of 16 to 128 characters")
        self.address, self.timeout_s, self.backend = address, float(timeout_s), backend
        self.session = uuid.uuid4().hex
        self.group = group
        self.metrics = ClientMetrics()  # round trips as this client sees them (own registry)
        self._channel = Channel(address, self.session, group, self.timeout_s,
                                self.metrics.server_unavailable)
        try:
            uid = server_uid(address)
            if uid is None:
                raise ServerUnavailable(f"no gpukv server listens on {address}")
            if uid not in (-1, os.getuid()):
                raise ValueError(f"the server at {address} runs as uid {uid}, not as this user "
                                 f"({os.getuid()}): refusing to send it anything")
            info = self._call(p.Ping(os.getpid()), timeout_s=connect_timeout_s)
        except BaseException:
            self.close()
            raise
        self.chunk_size: int = info["chunk_size"]
        self.salt: str = info["salt"]
        self.server_info: dict = info
        self.copies = WorkerCopies(RemoteBooks(lambda body: self._call(body), self.chunk_size,
                                               self.salt, info.get("arenas")),
                                   backend=backend, on_finish=self._copy_finished)
        interval = info["worker_timeout_s"] / 4 if ping_interval_s is None else ping_interval_s
        if interval > 0:
            self._channel.keep_alive(interval)

    # ---- registration and copies: WorkerPath (register, store, retrieve, ...), and ----------
    def unregister(self, instance_id: Hashable) -> None:
        self.copies.forget(instance_id)
        self._call(p.Unregister(instance_id))

    def lookup(self, model: str, token_ids: TokenIds, *, request_id: Hashable, tp_size: int = 1,
               num_readers: int | None = None, seed: bytes = b"", extras=None,
               loadable: bool = False) -> int:
        """Leading tokens held; tops the request's shares up to ``num_readers or tp_size`` per
        MLA object (a repeated lookup takes no more). ``loadable``: 0 unless this client's group
        has registered instances of ``model`` for every TP rank ``0..tp_size-1`` (a scheduler
        whose workers must be able to load what it is told)."""
        return self.lookup_hashes(model, self.copies.hashes(token_ids, seed, extras),
                                  request_id=request_id, tp_size=tp_size, num_readers=num_readers,
                                  loadable=loadable)

    def lookup_hashes(self, model: str, hashes: list[bytes], *, request_id: Hashable,
                      tp_size: int = 1, num_readers: int | None = None, loadable: bool = False) -> int:
        t0 = time.perf_counter()
        hit = self._call(p.Lookup(model, request_id, list(hashes), tp_size, num_readers, loadable))
        self.metrics.lookup(time.perf_counter() - t0)
        return hit

    def lookup_tiers(self, model: str, token_ids: TokenIds, *, request_id: Hashable,
                     tp_size: int = 1, num_readers: int | None = None, seed: bytes = b"",
                     extras=None, loadable: bool = False) -> LookupHit:
        """:meth:`lookup`, with where each chunk of the hit came from (a :class:`LookupHit` in
        chunks; its ``sources`` None from a server that cannot say)."""
        return self.lookup_hashes_tiers(model, self.copies.hashes(token_ids, seed, extras),
                                        request_id=request_id, tp_size=tp_size,
                                        num_readers=num_readers, loadable=loadable)

    def lookup_hashes_tiers(self, model: str, hashes: list[bytes], *, request_id: Hashable,
                            tp_size: int = 1, num_readers: int | None = None,
                            loadable: bool = False) -> LookupHit:
        if "lookup_tiers" not in self.server_info.get("features", ()):
            tokens = self.lookup_hashes(model, hashes, request_id=request_id, tp_size=tp_size,
                                        num_readers=num_readers, loadable=loadable)
            return LookupHit(tokens // self.chunk_size, None)
        t0 = time.perf_counter()
        reply = self._call(p.Lookup(model, request_id, list(hashes), tp_size, num_readers, loadable,
                                    tiers=True))
        self.metrics.lookup(time.perf_counter() - t0)
        if not isinstance(reply, dict) or not isinstance(reply.get("tokens"), int):
            raise ServerError(f"LOOKUP reply {reply!r:.80} is not {{tokens, sources}}")
        chunks = reply["tokens"] // self.chunk_size
        try:
            return LookupHit(chunks, parse_runs(reply.get("sources"), chunks))
        except ValueError as exc:
            raise ServerError(f"LOOKUP reply: {exc}") from None

    def vllm_blocks(self, body: p.VllmBlocks) -> dict:
        """Describe chunks as vLLM blocks (see :class:`gpukv.frontend.protocol.VllmBlocks`);
        the reply: ``epoch``, ``events`` (with ``take_events``: encoded vLLM events), ``more``."""
        return self._call(body)

    def free_lookup_locks(self, request_id: Hashable, *, start_token: int = 0,
                          end_token: int | None = None, tp_size: int = 1) -> int:
        """Release the request's shares on chunks inside ``[start_token, end_token)`` (all by
        default); returns how many."""
        token_range(start_token, end_token, self.chunk_size)  # ValueError naming a bad bound
        return self._call(p.FreeLookupLocks(request_id, start_token, end_token, tp_size))

    def end_session(self, request_id: Hashable) -> None:
        self._call(p.EndSession(request_id))

    def stats(self) -> dict:
        return self._call(p.Stats(), timeout_s=max(self.timeout_s, 60.0))

    def read_counts(self, model: str, token_ids: TokenIds, *, kv_rank: int = 0,
                    seed: bytes = b"") -> dict:
        """Read-only debug view of a prefix's objects: lists ``read_counts``, ``present`` and
        ``evictable``, one entry per full chunk."""
        hashes = self.copies.hashes(token_ids, seed)
        return self._call(p.Stats(p.ReadCounts(model, hashes, kv_rank)))["query"]

    def read_count(self, model: str, token_ids: TokenIds, *, kv_rank: int = 0,
                   seed: bytes = b"") -> list[int]:
        """Shares held on each full chunk's object (like :meth:`CacheEngine.read_count`)."""
        return self.read_counts(model, token_ids, kv_rank=kv_rank, seed=seed)["read_counts"]

    def flush(self, timeout_s: float | None = None) -> bool:
        return self._call(p.Flush(timeout_s), timeout_s=max(self.timeout_s, (timeout_s or 0) + 5))

    def ping(self, *, timeout_s: float | None = None) -> dict:
        """The server's identity (protocol version, chunk size, salt, devices, worker timeout)."""
        return self._call(p.Ping(os.getpid()), timeout_s=timeout_s)

    def close(self) -> None:
        """Stop pinging and close the sockets (the server reaps the session after its timeout)."""
        self._channel.close()

    def __enter__(self) -> "CacheClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _copy_finished(self, op: str, seconds: float) -> None:
        (self.metrics.store if op == "store" else self.metrics.retrieve)(seconds)

    # ---- transport -------------------------------------------------------------------------
    def _call(self, body, *, timeout_s: float | None = None) -> Any:
        return self._channel.call(body, timeout_s)

