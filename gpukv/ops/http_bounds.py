"""Which connections an HTTP endpoint serves, and for how long: at most ``max_connections`` at
once (more are closed unanswered), at most ``max_per_peer`` of them for one other local user (the
owner of the peer's socket in ``/proc/net/tcp``) or one remote address (this user's own are
bounded by the total alone), and each within ``request_timeout_s`` for the whole request and its
answer: a watchdog (:meth:`BoundedHTTPServer.cut_overdue`) shuts the socket at its deadline,
however slowly the client trickles bytes, so its handler thread ends.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from http.server import ThreadingHTTPServer

from gpukv.ops.addresses import tcp_socket_uid

log = logging.getLogger(__name__)


class BoundedHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server whose connections are bounded (see the module docstring);
    ``admin`` has ``max_connections``, ``max_per_peer`` and ``request_timeout_s``."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], admin, family: int, handler: type) -> None:
        self.address_family = family
        self.admin = admin
        self._lock = threading.Lock()
        self._running: dict[socket.socket, tuple[float, object]] = {}  # -> (deadline, peer)
        self._per_peer: dict[object, int] = {}
        super().__init__(address, handler)

    def _peer(self, client_address) -> object:
        """Who a connection counts for: its socket's owner uid on loopback, else its address;
        None for this user (bounded only by the total)."""
        uid = tcp_socket_uid(client_address, self.server_address)
        if uid == os.getuid():
            return None
        return ("uid", uid) if uid is not None else ("address", client_address[0])

    def process_request(self, request, client_address) -> None:
        admin = self.admin
        peer = self._peer(client_address)
        with self._lock:
            full = len(self._running) >= admin.max_connections or (
                peer is not None and self._per_peer.get(peer, 0) >= admin.max_per_peer)
            if not full:
                self._running[request] = (time.monotonic() + admin.request_timeout_s, peer)
                self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
        if full:
            self.shutdown_request(request)  # over a bound: close unanswered
            return
        try:
            super().process_request(request, client_address)
        except RuntimeError:  # no thread could be started
            self._done(request)
            self.shutdown_request(request)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._done(request)

    def _done(self, request) -> None:
        with self._lock:
            _, peer = self._running.pop(request, (0.0, None))
            left = self._per_peer.get(peer, 1) - 1
            if left:
                self._per_peer[peer] = left
            else:
                self._per_peer.pop(peer, None)

    def cut_overdue(self) -> int:
        """Shut the sockets of requests past their deadline (their handler then sees EOF or an
        error and ends); returns how many."""
        now = time.monotonic()
        with self._lock:
            overdue = [sock for sock, (deadline, _) in self._running.items() if deadline < now]
        for sock in overdue:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by its handler
        return len(overdue)

    def handle_error(self, request, client_address) -> None:
        log.debug("admin connection from %s failed", client_address, exc_info=True)
