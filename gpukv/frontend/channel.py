"""``Channel``: a client's request/reply transport to ``gpukv serve``.

Any thread may call; each call borrows a DEALER socket from a pool and gives it back after the
reply, so calls from several threads run side by side and a reply can only reach its own call
(the sequence number is checked; a socket whose call failed or timed out is closed, never pooled,
so a late reply can never reach another call). Every call has a timeout: a dead or overloaded
server raises :class:`ServerUnavailable`, never hangs. An error reply is raised as the exception
type the server named (ValueError, TypeError, Busy) or :class:`ServerError`.

A daemon thread can PING at a fixed interval (:meth:`Channel.keep_alive`) so the server sees the
process alive while it idles.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from typing import Any

import msgspec
import zmq

from gpukv.curve_keys import load_keys, secure_client
from gpukv.errors import Busy
from gpukv.frontend import protocol as p
from gpukv.zmq_context import OwnedContext

log = logging.getLogger(__name__)

_ERRORS = {"ValueError": ValueError, "TypeError": TypeError, "Busy": Busy}


class ServerUnavailable(ConnectionError):
    """The server did not answer in time (dead, stopped or overloaded), or nobody listens."""


class ServerError(RuntimeError):
    """The server failed a request for a reason other than bad input."""


class Channel:
    """Requests of session ``session`` (in ``group``) to the server at ``address``.

    ``on_unavailable`` is called (no arguments) each time a reply does not come in time.
    """

    def __init__(self, address: str, session: str, group: str | None, timeout_s: float,
                 on_unavailable=None) -> None:
        self.address, self.session, self.group = address, session, group
        self.timeout_s = float(timeout_s)
        self._on_unavailable = on_unavailable
        # tcp:// servers run CURVE: this user's key file (ValueError if it cannot be read)
        self._keys = load_keys() if address.startswith("tcp://") else None
        self._zmq = OwnedContext(self)  # closed even if this channel is dropped unclosed
        self._pool: list[zmq.Socket] = []
        self._rcvtimeo: dict[zmq.Socket, int] = {}  # the timeout each pooled socket has set
        self._pool_lock = threading.Lock()
        self._seq = itertools.count(1)
        self._closed = threading.Event()
        self._pinger: threading.Thread | None = None

    def call(self, body, timeout_s: float | None = None) -> Any:
        """Send ``body`` (a protocol request) and return the reply's value."""
        if self._closed.is_set():
            raise ValueError(f"client of {self.address} is closed")
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        seq = next(self._seq)
        try:
            frame = p.encode_request(seq, self.session, body, self.group)
        except (msgspec.EncodeError, TypeError) as exc:  # e.g. an id that is neither str nor int
            raise TypeError(f"cannot send {body.__struct_config__.tag}: {exc}") from None
        sock = self._borrow()
        try:
            timeout_ms = max(1, int(timeout_s * 1000))
            if self._rcvtimeo.get(sock) != timeout_ms:  # a setsockopt per call is not free
                sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
                self._rcvtimeo[sock] = timeout_ms
            sock.send(frame, copy=len(frame) < 65536)
            while True:
                try:
                    reply = p.decode_reply(sock.recv())
                except zmq.Again:
                    if self._on_unavailable is not None:
                        self._on_unavailable()
                    raise ServerUnavailable(
                        f"gpukv server at {self.address} did not answer "
                        f"{body.__struct_config__.tag} within {timeout_s:.1f} s") from None
                if reply.seq in (seq, 0):
                    break
        except BaseException:
            self._zmq.close_socket(sock)  # a late reply must never reach another call
            self._rcvtimeo.pop(sock, None)
            raise
        self._give_back(sock)
        if not reply.ok:
            raise _ERRORS.get(reply.error_type, ServerError)(f"{reply.error} (server {self.address})")
        return reply.value

    def keep_alive(self, interval_s: float) -> None:
        """PING every ``interval_s`` seconds from a daemon thread until :meth:`close`."""
        self._pinger = threading.Thread(target=self._ping_loop, args=(interval_s,),
                                        name="gpukv-client-ping", daemon=True)
        self._pinger.start()

    def close(self) -> None:
        """Stop pinging and close the sockets; later calls raise ValueError."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._pinger is not None and self._pinger is not threading.current_thread():
            self._pinger.join(timeout=5)
        with self._pool_lock:
            for sock in self._pool:
                self._zmq.close_socket(sock)
            self._pool.clear()
            self._rcvtimeo.clear()
        self._zmq.terminate()  # a call in flight fails with ETERM and closes its socket

    def _borrow(self) -> zmq.Socket:
        with self._pool_lock:
            if self._pool:
                return self._pool.pop()
            sock = self._zmq.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self._keys is not None:
            secure_client(sock, self._keys)
        sock.connect(self.address)
        return sock

    def _give_back(self, sock: zmq.Socket) -> None:
        with self._pool_lock:
            if self._closed.is_set():
                self._zmq.close_socket(sock)
                self._rcvtimeo.pop(sock, None)
            else:
                self._pool.append(sock)

    def _ping_loop(self, interval_s: float) -> None:
        while not self._closed.wait(interval_s):
            try:
                self.call(p.Ping(os.getpid()), timeout_s=max(interval_s, 1.0))
            except (ServerUnavailable, ServerError, ValueError) as exc:  # the server may restart
                log.debug("ping of %s failed: %s", self.address, exc)
