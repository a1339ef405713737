"""``gpukv serve``: one cache server process for every worker of a machine.

The server owns the L1 arenas (one per device, shared with the workers) and keeps the books;
workers run the copies themselves. One ROUTER socket (clients use DEALER; see
:mod:`gpukv.frontend.protocol`; on tcp:// with CURVE, :mod:`gpukv.curve_keys`), and one thread,
the loop, touches it. Every request is bookkeeping (no bytes of KV cross the socket), so the
loop answers most of them itself in microseconds; a lookup that may read the disk or remote
tier, a large request (more than ``fairpool.INLINE_KEYS`` objects, or a frame over
``INLINE_FRAME_BYTES``, which the loop does not even decode: it reads the envelope and the pool
decodes the rest), STATS and FLUSH go to a small pool, so a long one never stalls a ping or
another worker. Pool threads put their replies on a queue and wake the loop through a pipe;
while no pool work is in flight the loop blocks on its socket alone (polling the socket and the
pipe costs more per request), waking every ``BLOCK_MS``. Reaping and lease expiry run in a
thread of their own (they take the books' locks, which a maximal request may hold for a while).

Robustness: every request gets a reply (an error naming the problem for bad input, ``Busy``
past a bound); nothing a client sends can end the loop. Per session, requests waiting in the
pool are bounded in number and bytes (``max_pending``, ``max_pending_bytes``), and per client
connection at most ``RCVHWM`` frames wait in the socket (a client pipelining more waits in its
own send). Liveness is judged from frames *received*: a session is reaped only when it was
silent for the worker timeout before the last moment the loop found its socket empty (a backlog
on the loop never reaps live clients; a loop that never catches up reaps nobody).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time

import zmq

from gpukv.curve_keys import CurveServer, load_keys
from gpukv.errors import Busy
from gpukv.frontend import protocol as p
from gpukv.frontend.fairpool import FairPool, PendingBound, pooled
from gpukv.frontend.liveness import peer_pid
from gpukv.frontend.peer import bind, ipc_path
from gpukv.frontend.server_config import ServerConfig
from gpukv.frontend.sessions import Limits, Sessions
from gpukv.zmq_context import OwnedContext

log = logging.getLogger(__name__)

__all__ = ["CacheServer", "Limits", "ServerConfig"]

RCVHWM = 16  # a client pipelining more waits in its own send (each call has one in flight)
INLINE_FRAME_BYTES = 96 << 10  # larger frames are decoded in the pool (> INLINE_KEYS hashes)
BLOCK_MS = 100  # the longest the loop blocks on its socket alone: stop() takes effect by then
_UNSEEN = object()
MAX_CONNECTIONS_SEEN = 1 << 16  # identity -> pid entries kept


class CacheServer:
    """Serves a :class:`gpukv.engine.core.CacheCore` (made with ``shared=True``) over ZMQ
    until :meth:`stop` is called."""

    def __init__(self, core, config: ServerConfig | None = None) -> None:
        self.core = core
        self.config = config = config or ServerConfig()
        self.sessions = Sessions(core, worker_timeout_s=config.worker_timeout_s,
                                 limits=config.limits, orphan_hold_s=config.orphan_hold_s,
                                 check_holes=config.check_holes)
        self._zmq = OwnedContext(self)  # closed even if this server is dropped unserved
        self._router = self._zmq.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.MAXMSGSIZE, p.MAX_FRAME_BYTES)
        self._router.setsockopt(zmq.RCVHWM, RCVHWM)  # frames queued per client connection
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self._curve: CurveServer | None = None
        try:
            if config.address.startswith("tcp://"):  # any local user can reach a port: CURVE
                self._curve = CurveServer(self._zmq.ctx, load_keys(config.key_file, create=True))
                self._curve.secure(self._router)
            bind(self._router, config.address)
        except BaseException:
            if self._curve is not None:
                self._curve.stop()
            self._zmq.close()
            raise
        self.address = self._router.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._replies: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._stopping = threading.Event()
        self._pool = FairPool(config.threads)  # sessions in turn: no client waits behind a flood
        self._pending = PendingBound(config.max_pending, config.max_pending_bytes)
        self._in_pool = 0  # pooled requests whose reply the loop has not taken yet (loop only)
        self.last_drained = time.monotonic()  # the loop last found its socket empty
        self._pids: dict[bytes, int | None] = {}  # connection identity -> its peer's pid (loop)

    # ---- the ROUTER loop -------------------------------------------------------------------
    def serve_forever(self) -> None:
        """Run the loop in this thread until :meth:`stop`; then release everything."""
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        idle_ms = min(1.0, self.config.worker_timeout_s / 4) * 1000
        self._router.setsockopt(zmq.RCVTIMEO, int(min(idle_ms, BLOCK_MS)))
        reaper = threading.Thread(target=self._reap_loop, name="gpukv-reaper", daemon=True)
        reaper.start()
        log.info("gpukv server listening on %s (devices %s, chunk_size=%d, worker timeout %.1f s)",
                 self.address, ",".join(self.core.devices), self.core.config.chunk_size,
                 self.config.worker_timeout_s)
        try:
            while not self._stopping.is_set():
                if not self._in_pool:  # no reply can come from the pool: wait on the socket alone
                    self._wait_and_drain()
                    continue
                events = dict(poller.poll(idle_ms))
                if self._wake_r in events:
                    os.read(self._wake_r, 65536)
                self._send_replies()
                if self._router in events:
                    self._drain(64)
                else:
                    self.last_drained = time.monotonic()  # nothing waiting on the socket
        finally:
            self._stopping.set()
            reaper.join()
            self._shutdown()

    def _wait_and_drain(self) -> None:
        """Block on the socket alone (up to ``BLOCK_MS``), then drain it: a poll of the socket
        and the wake-up pipe costs more per request, which the loop pays only while pool work
        is in flight (its replies come through the pipe)."""
        try:
            frames, pid = self._recv(0)
        except zmq.Again:
            self.last_drained = time.monotonic()  # nothing arrived in BLOCK_MS
            return
        self._handle(frames, pid)
        self._drain(63)

    def _drain(self, budget: int) -> None:
        router = self._router
        for _ in range(budget):
            # asking is cheaper than a failed recv (1.2 vs 2.9 us), paid after each reply is out
            if not router.get(zmq.EVENTS) & zmq.POLLIN:
                self.last_drained = time.monotonic()
                return
            try:
                frames, pid = self._recv(zmq.NOBLOCK)
            except zmq.Again:
                self.last_drained = time.monotonic()
                return
            self._handle(frames, pid)

    def _recv(self, flags: int) -> tuple[list[bytes], int | None]:
        """The sender's identity and frames (``recv_multipart`` without its per-frame option
        read and loop, which cost per request), and its pid as the kernel told libzmq (ipc://; None on
        tcp://), read once per connection (a frame object and a property read cost more than
        the rest): an identity the ROUTER made (a zero byte first) is never reused while it
        lives; one a peer chose is read every time."""
        router = self._router
        identity = router.recv(flags)
        pid = self._pids.get(identity, _UNSEEN)
        if pid is _UNSEEN:
            first = router.recv(zmq.NOBLOCK, copy=False)  # the rest came with the identity
            frames = [identity, first.bytes]
            pid = peer_pid(first.get("Peer-Address"))
            if identity[:1] == b"\0":
                if len(self._pids) >= MAX_CONNECTIONS_SEEN:
                    self._pids.clear()  # (mostly dead connections' ids)
                self._pids[identity] = pid
        else:
            frames = [identity, router.recv(zmq.NOBLOCK)]
        while router.get(zmq.RCVMORE):
            frames.append(router.recv(zmq.NOBLOCK))
        return frames, pid

    def _handle(self, frames: list[bytes], pid: int | None) -> None:
        try:
            self._on_frames(frames, pid)
        except Exception:  # noqa: BLE001 - nothing a client sends may end the loop
            log.warning("dropped a request that failed outside its handler", exc_info=True)

    def _reap_loop(self) -> None:
        """The reaper's own thread: reaping and lease expiry take the books' locks, which a pool
        thread may hold for a maximal request; the loop never waits for them."""
        every = min(1.0, self.config.worker_timeout_s / 4)
        while not self._stopping.wait(every):
            self._reap()

    def _reap(self) -> None:
        # silent for the whole worker timeout before the loop last caught up with its socket:
        # every frame sent before ``last_drained`` was received, later ones may wait in a backlog
        cutoff = self.last_drained - self.config.worker_timeout_s
        try:
            self.sessions.reap_idle(cutoff)
            self.core.maybe_expire()
        except Exception:  # noqa: BLE001 - the reaper must live on
            log.warning("reaping failed", exc_info=True)

    def _on_frames(self, frames: list[bytes], pid: int | None) -> None:
        identity = frames[0]
        if len(frames) != 2:
            self._send(identity, p.error_reply(0, p.ProtocolError(
                f"a request is one frame, got {len(frames) - 1}")))
            return
        frame = frames[1]
        try:  # a large frame is decoded in the pool: the loop only reads its envelope
            request = p.decode_request(frame) if len(frame) <= INLINE_FRAME_BYTES else None
            envelope = request or p.decode_envelope(frame)
            self.sessions.touch(envelope.session, envelope.group, pid)
        except ValueError as exc:
            log.debug("bad request: %s", exc)
            self._send(identity, p.error_reply(getattr(exc, "seq", 0), exc))
            return
        if request is not None and not pooled(request.body, self.core):
            self._send(identity, self._run(request))
            return
        busy = self._pending.admit(envelope.session, len(frame))
        if busy is not None:
            self._rejected()
            self._send(identity, p.error_reply(envelope.seq, busy))
            return
        self._pool.submit(envelope.session, self._run_and_queue, identity, request or frame,
                          envelope.session, len(frame))
        self._in_pool += 1  # each pooled request queues exactly one reply

    def _run(self, request: p.Request) -> p.Reply:
        try:
            return p.ok_reply(request.seq, self.sessions.handle(request.session, request.body))
        except Exception as exc:  # noqa: BLE001 - the loop must answer every request and live on
            if isinstance(exc, (ValueError, TypeError, KeyError)):
                log.debug("request %s failed: %s", type(request.body).__name__, exc)
            else:
                log.warning("request %s failed", type(request.body).__name__, exc_info=True)
            if isinstance(exc, Busy):
                self._rejected()
            return p.error_reply(request.seq, exc)

    def _rejected(self) -> None:
        if self.core.observer.metrics is not None:
            self.core.observer.metrics.rejected("busy")

    def _run_and_queue(self, identity: bytes, request: p.Request | bytes, session: str,
                       nbytes: int) -> None:
        try:
            if isinstance(request, bytes):
                request = p.decode_request(request)
            reply = self._run(request)
        except p.ProtocolError as exc:
            reply = p.error_reply(exc.seq, exc)
        finally:
            self._pending.done(session, nbytes)
        self._replies.put((identity, reply))
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (a wake-up is pending anyway) or closed at shutdown

    def _send_replies(self) -> None:
        replies = self._replies
        while not replies.empty():  # the loop is the only consumer
            identity, reply = replies.get_nowait()
            self._in_pool -= 1
            self._send(identity, reply)

    def _send(self, identity: bytes, reply: p.Reply) -> None:
        try:
            frame = p.encode_reply(reply)
            self._router.send(identity, zmq.SNDMORE | zmq.NOBLOCK)  # cheaper than send_multipart
            self._router.send(frame, zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # the client is gone or not reading: drop its reply
            log.debug("reply dropped: %s", exc)

    # ---- lifecycle -------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the loop to exit (thread- and signal-safe)."""
        self._stopping.set()
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    def _shutdown(self) -> None:
        self._pool.shutdown()
        self._send_replies()
        self.sessions.close()
        if self._curve is not None:
            self._curve.stop()  # its ZAP sockets live in the context too
        self._zmq.close()  # the ROUTER socket, then the context
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self.address.startswith("ipc://") and not ipc_path(self.address).startswith("@"):
            try:
                os.unlink(ipc_path(self.address))
            except FileNotFoundError:
                pass
        log.info("gpukv server on %s stopped", self.address)
