"""``CacheClient``: the :class:`gpukv.CacheEngine` API, served by a ``gpukv serve`` process.

A worker switches between embedded and server mode by construction alone::

    cache = CacheEngine(EngineConfig(...))        # embedded
    cache = CacheClient("ipc:///run/gpukv.sock")  # one server for every worker of the machine

Same methods, arguments and return values (``register``, ``unregister``, ``store``, ``lookup``,
``retrieve``, ``free_lookup_locks``, ``end_session``, ``stats``, ``flush``, ``close``), plus
``ping``. Only metadata crosses the socket: ``register`` sends handles of the worker's KV tensors
(CPU: allocate them with :class:`gpukv.frontend.shm.ShmAllocator`; CUDA: IPC handles), and the server runs
the copy kernels on the worker's own memory. ``lookup`` hashes the prompt here (with the
server's ``chunk_size`` and salt, learned at connect) and sends 16 bytes per chunk.

CUDA ordering (UNTESTED: no GPU in CI): ``store`` synchronizes the worker's current CUDA stream
before sending, so its writes to the pages are complete before the server's kernel reads them;
the server synchronizes its own stream before it answers ``retrieve``.

Ids: instance and request ids are ``str`` or ``int`` here (the engine takes any hashable).

Threads: any thread may call any method; each call borrows a DEALER socket from a pool (one per
concurrent call), so a long ``store`` never blocks a ``lookup`` from another thread. Every call has
a timeout: a dead server raises :class:`ServerUnavailable` naming the address, never hangs.

Liveness: a daemon thread PINGs the server every ``worker_timeout / 4`` seconds, so the server's
reaper sees this process alive while it idles. When the process dies (even by SIGKILL), pings
stop and the server releases this client's shares and drops its mappings after the timeout. A
client that was reaped while alive (stopped for longer than the timeout) or whose server
restarted gets "unknown instance" errors: it must ``register`` again.
"""

from __future__ import annotations

import itertools
import logging
import threading
import uuid
from typing import Any, Hashable

import msgspec
import torch
import zmq

from gpukv.engine.keys import TokenIds, as_token_array, chunk_hashes
from gpukv.frontend.protocol import (PROTOCOL_VERSION, EndSession, Flush, FreeLookupLocks, Lookup, Ping,
                            ReadCounts, Register, Retrieve, Stats, Store, Unregister, decode_reply,
                            default_address, encode_request)
from gpukv.frontend.worker_memory import describe

log = logging.getLogger(__name__)


class ServerUnavailable(ConnectionError):
    """The server did not answer in time (dead, stopped or overloaded)."""


class ServerError(RuntimeError):
    """The server failed a request for a reason other than bad input."""


class CacheClient:
    """A connection to a ``gpukv serve`` process at ``address`` (``ipc://...`` or ``tcp://...``;
    default: :func:`gpukv.frontend.protocol.default_address`, the server's default).

    ``timeout_s`` bounds every call (a transfer of many GB may need more: pass a larger one).
    ``ping_interval_s`` defaults to a quarter of the server's worker timeout; 0 disables pings.
    """

    def __init__(self, address: str | None = None, *, timeout_s: float = 30.0,
                 connect_timeout_s: float = 10.0, ping_interval_s: float | None = None) -> None:
        address = default_address() if address is None else address
        if not isinstance(address, str) or not address.startswith(("ipc://", "tcp://")):
            raise ValueError(f"address must be ipc://<path> or tcp://<host>:<port>, "
                             f"got {address!r}")
        if timeout_s <= 0 or connect_timeout_s <= 0:
            raise ValueError(f"timeouts must be positive, got {timeout_s!r}, {connect_timeout_s!r}")
        self.address = address
        self.timeout_s = float(timeout_s)
        self.session = uuid.uuid4().hex
        self._ctx = zmq.Context()
        self._pool: list[zmq.Socket] = []
        self._pool_lock = threading.Lock()
        self._seq = itertools.count(1)
        self._closed = threading.Event()
        self._cuda: dict[Hashable, torch.device] = {}  # instances whose pages are on a GPU
        self._pinger: threading.Thread | None = None
        try:
            info = self._call(Ping(), timeout_s=connect_timeout_s)
            if info.get("version") != PROTOCOL_VERSION:
                raise ServerError(f"server at {address} speaks protocol {info.get('version')!r},"
                                  f" this client {PROTOCOL_VERSION}")
        except BaseException:
            self.close()
            raise
        self.chunk_size: int = info["chunk_size"]
        self.salt: str = info["salt"]
        self.server_info: dict = info
        interval = info["worker_timeout_s"] / 4 if ping_interval_s is None else ping_interval_s
        if interval > 0:
            self._pinger = threading.Thread(target=self._ping_loop, args=(interval,),
                                            name="gpukv-client-ping", daemon=True)
            self._pinger.start()

    # ---- the engine API --------------------------------------------------------------------
    def register(self, instance_id: Hashable, model: str, kv_caches, dims: str, *,
                 kind: str = "mha", tp_rank: int = 0, tp_size: int = 1) -> None:
        """Share this worker's KV tensors with the server (see :meth:`CacheEngine.register`)."""
        layers = list(kv_caches.values()) if isinstance(kv_caches, dict) else list(kv_caches)
        kv_pair = len(layers) == 2 and all(isinstance(x, (list, tuple)) for x in layers)
        if kv_pair:  # SGLang MHA pools: (k_layers, v_layers)
            if len(layers[0]) != len(layers[1]):
                raise ValueError(f"k_layers and v_layers differ in length: {len(layers[0])} != "
                                 f"{len(layers[1])}")
            layers = list(layers[0]) + list(layers[1])
        self._call(Register(instance_id, model, dims, kind, tp_rank, tp_size,
                            [describe(t) for t in layers], kv_pair))
        if layers and isinstance(layers[0], torch.Tensor) and layers[0].is_cuda:
            self._cuda[instance_id] = layers[0].device

    def unregister(self, instance_id: Hashable) -> None:
        self._call(Unregister(instance_id))
        self._cuda.pop(instance_id, None)

    def store(self, instance_id: Hashable, token_ids: TokenIds, slot_mapping: torch.Tensor) -> int:
        """Tokens newly stored; the server packs them straight out of this worker's pages.

        CUDA pages: the current stream is synchronized first, so the worker's writes to the
        pages are complete before the server's kernel reads them (another process, another
        stream). UNTESTED on GPU (no GPU in CI).
        """
        device = self._cuda.get(instance_id)
        if device is not None:
            torch.cuda.current_stream(device).synchronize()
        return self._call(Store(instance_id, _int64_bytes(token_ids, "token_ids"),
                                _slots_bytes(slot_mapping)))

    def lookup(self, model: str, token_ids: TokenIds, *, request_id: Hashable, tp_size: int = 1,
               num_readers: int | None = None) -> int:
        """Leading tokens held; takes ``num_readers or tp_size`` shares per MLA object."""
        hashes = chunk_hashes(token_ids, self.chunk_size, seed=self.salt.encode())
        return self.lookup_hashes(model, hashes, request_id=request_id, tp_size=tp_size,
                                  num_readers=num_readers)

    def lookup_hashes(self, model: str, hashes: list[bytes], *, request_id: Hashable,
                      tp_size: int = 1, num_readers: int | None = None) -> int:
        return self._call(Lookup(model, request_id, tp_size, num_readers, hashes=list(hashes)))

    def retrieve(self, instance_id: Hashable, token_ids: TokenIds, slot_mapping: torch.Tensor, *,
                 request_id: Hashable) -> int:
        """Tokens written into this worker's pages (all or nothing)."""
        return self._call(Retrieve(instance_id, request_id, _int64_bytes(token_ids, "token_ids"),
                                   _slots_bytes(slot_mapping)))

    def free_lookup_locks(self, request_id: Hashable, *, tp_size: int = 1) -> int:
        return self._call(FreeLookupLocks(request_id, tp_size))

    def end_session(self, request_id: Hashable) -> None:
        self._call(EndSession(request_id))

    def stats(self) -> dict:
        return self._call(Stats())

    def read_counts(self, model: str, token_ids: TokenIds, *, kv_rank: int = 0) -> dict:
        """Read-only debug view of a prefix's objects: lists ``read_counts``, ``present`` and
        ``evictable``, one entry per full chunk."""
        hashes = chunk_hashes(token_ids, self.chunk_size, seed=self.salt.encode())
        return self._call(Stats(ReadCounts(model, kv_rank, hashes=hashes)))["query"]

    def read_count(self, model: str, token_ids: TokenIds, *, kv_rank: int = 0) -> list[int]:
        """Shares held on each full chunk's object (like :meth:`CacheEngine.read_count`)."""
        return self.read_counts(model, token_ids, kv_rank=kv_rank)["read_counts"]

    def flush(self, timeout_s: float | None = None) -> bool:
        return self._call(Flush(timeout_s), timeout_s=max(self.timeout_s, (timeout_s or 0) + 5))

    def ping(self, *, timeout_s: float | None = None) -> dict:
        """The server's identity (protocol version, chunk size, salt, device, worker timeout)."""
        return self._call(Ping(), timeout_s=timeout_s)

    def close(self) -> None:
        """Stop pinging and close the sockets (the server reaps the session after its timeout)."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._pinger is not None and self._pinger is not threading.current_thread():
            self._pinger.join(timeout=5)
        with self._pool_lock:
            for sock in self._pool:
                sock.close(linger=0)
            self._pool.clear()
        self._ctx.term()

    def __enter__(self) -> "CacheClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- transport -------------------------------------------------------------------------
    def _call(self, body, *, timeout_s: float | None = None) -> Any:
        if self._closed.is_set():
            raise ValueError(f"client of {self.address} is closed")
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        seq = next(self._seq)
        try:
            frame = encode_request(seq, self.session, body)
        except msgspec.EncodeError as exc:  # e.g. an id that is neither str nor int
            raise TypeError(f"cannot send {body.__struct_config__.tag}: {exc}") from None
        sock = self._borrow()
        try:
            sock.setsockopt(zmq.RCVTIMEO, max(1, int(timeout_s * 1000)))
            sock.send(frame, copy=len(frame) < 65536)
            while True:
                try:
                    reply = decode_reply(sock.recv())
                except zmq.Again:
                    raise ServerUnavailable(
                        f"gpukv server at {self.address} did not answer "
                        f"{body.__struct_config__.tag} within {timeout_s:.1f} s") from None
                if reply.seq in (seq, 0):
                    break
        except BaseException:
            sock.close(linger=0)  # a late reply must never reach another call
            raise
        self._give_back(sock)
        if not reply.ok:
            error = {"ValueError": ValueError, "TypeError": TypeError}.get(reply.error_type,
                                                                           ServerError)
            raise error(f"{reply.error} (server {self.address})")
        return reply.value

    def _borrow(self) -> zmq.Socket:
        with self._pool_lock:
            if self._pool:
                return self._pool.pop()
            sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.address)
        return sock

    def _give_back(self, sock: zmq.Socket) -> None:
        with self._pool_lock:
            if self._closed.is_set():
                sock.close(linger=0)
            else:
                self._pool.append(sock)

    def _ping_loop(self, interval_s: float) -> None:
        while not self._closed.wait(interval_s):
            try:
                self._call(Ping(), timeout_s=max(interval_s, 1.0))
            except (ServerUnavailable, ServerError, ValueError) as exc:  # the server may restart
                log.debug("ping of %s failed: %s", self.address, exc)


def _int64_bytes(values: TokenIds, name: str) -> bytes:
    try:
        return as_token_array(values).tobytes()
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def _slots_bytes(slot_mapping: torch.Tensor) -> bytes:
    if not isinstance(slot_mapping, torch.Tensor):
        raise ValueError(f"slot_mapping must be a torch.Tensor, got {type(slot_mapping).__name__}")
    if slot_mapping.dim() != 1 or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be 1-D int32/int64, got shape "
                         f"{tuple(slot_mapping.shape)} dtype {slot_mapping.dtype}")
    return slot_mapping.detach().to("cpu", torch.int64).numpy().tobytes()
