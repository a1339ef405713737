"""``OwnedContext``: a private ZMQ context and the sockets made from it, torn down in the right
order however its owner goes away.

pyzmq destroys a context nobody closed from the context's ``__del__``: it closes the sockets it
tracks (weakly) and then terminates. When the owner dies inside a garbage cycle (an exception's
traceback is the usual one: a test that failed, a constructor that raised), Python clears every
weak reference into the cycle before it runs any ``__del__``: the context no longer sees its
sockets, so ``term()`` waits for sockets that nobody will close, in whatever thread happened to
collect, for ever. Here the owner's ``weakref.finalize`` holds the context and its sockets
strongly, and weak-reference callbacks run before ``__del__`` methods: it closes the sockets
first, then terminates the context. :meth:`OwnedContext.close` runs the same step once.

Used by every gpukv object that owns sockets: the client's channel, the server, the event
publisher and subscriber.
"""

from __future__ import annotations

import weakref

import zmq


def _close(ctx: zmq.Context, sockets: set) -> None:
    for sock in list(sockets):
        sock.close(linger=0)
    sockets.clear()
    ctx.term()


class OwnedContext:
    """A ``zmq.Context`` whose sockets are closed, then the context terminated, when
    :meth:`close` is called or when ``owner`` is collected unclosed.
    Sockets are closed with no linger: an owner that must let its last messages out closes that
    socket itself (:meth:`close_socket` with a linger) before :meth:`close`."""

    def __init__(self, owner: object) -> None:
        self.ctx = zmq.Context()
        self._sockets: set[zmq.Socket] = set()
        self._finalizer = weakref.finalize(owner, _close, self.ctx, self._sockets)
        # not at exit: a daemon thread may still be in a call on one of these sockets then, and
        # pyzmq leaves contexts alone at exit as well
        self._finalizer.atexit = False

    def socket(self, kind: int) -> zmq.Socket:
        """A new socket of ``kind`` (``zmq.DEALER`` ...), closed by :meth:`close` at the latest."""
        sock = self.ctx.socket(kind)
        self._sockets.add(sock)
        return sock

    def close_socket(self, sock: zmq.Socket, linger: int = 0) -> None:
        """Close one socket now (``linger`` ms for what it still has to send)."""
        sock.close(linger=linger)
        self._sockets.discard(sock)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Close every socket still open, then terminate the context (idempotent). Only when
        no other thread is using one of them: see :meth:`terminate`."""
        self._finalizer()

    def terminate(self) -> None:
        """Terminate the context, leaving open sockets to the threads using them: a call
        blocked on one fails with ``zmq.ContextTerminated`` and its thread closes it, and this
        waits until every socket is closed (idempotent)."""
        if self._finalizer.detach() is not None:
            self.ctx.term()
