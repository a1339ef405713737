"""A loopback TCP proxy that counts request/response turns and delays each: a slow (not dead)
server, and an independent count of round trips.

A *turn* starts when a client sends bytes after the server last answered it (or first on a
connection); TCP's splitting and merging of segments cannot change the count. Each turn's first
bytes wait ``delay_s`` before they are forwarded, so one round trip costs ``delay_s`` once.
"""

from __future__ import annotations

import selectors
import socket
import threading
import time


class DelayProxy:
    """``127.0.0.1:<port>`` forwarding to ``127.0.0.1:<target_port>``."""

    def __init__(self, target_port: int, delay_s: float = 0.0) -> None:
        self.target_port = target_port
        self.delay_s = delay_s
        self._lock = threading.Lock()
        self._turns = 0
        self._closing = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._accept_thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._accept_thread.start()

    @property
    def turns(self) -> int:
        with self._lock:
            return self._turns

    def reset(self) -> None:
        with self._lock:
            self._turns = 0

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def close(self) -> None:
        self._closing.set()
        self._accept_thread.join(5)
        for thread in self._threads:
            thread.join(5)
        self._listener.close()

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            server = socket.create_connection(("127.0.0.1", self.target_port))
            thread = threading.Thread(target=self._pump, args=(client, server), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        sel.register(client, selectors.EVENT_READ, server)
        sel.register(server, selectors.EVENT_READ, client)
        client_turn = False  # True while the client is sending and the server has not answered
        try:
            while not self._closing.is_set():
                for key, _ in sel.select(timeout=0.1):
                    data = key.fileobj.recv(1 << 20)
                    if not data:
                        return
                    if key.fileobj is client and not client_turn:
                        client_turn = True
                        with self._lock:
                            self._turns += 1
                        if self.delay_s:
                            time.sleep(self.delay_s)
                    elif key.fileobj is server:
                        client_turn = False
                    key.data.sendall(data)
        except OSError:
            return
        finally:
            sel.close()
            client.close()
            server.close()
