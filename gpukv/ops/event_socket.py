"""How gpukv's event sockets are protected: one place for gpukv's own KV events
(:mod:`gpukv.ops.events`) and the vLLM-format ones (:mod:`gpukv.ops.router_events`).

An XPUB socket (it sees its subscriptions, so a publisher can wait for them) bound to a checked
address: ``ipc://`` only in a trusted folder, the socket file this user's alone
(:func:`gpukv.frontend.peer.bind`); never an abstract ``ipc://@`` name (any local user could
subscribe); ``tcp://`` loopback unless ``allow_remote``, and always CURVE with the key file's
keys (only its holders complete the handshake, and every frame is encrypted).
"""

from __future__ import annotations

import zmq

from gpukv.curve_keys import CurveServer, load_keys
from gpukv.frontend.peer import bind
from gpukv.ops.addresses import check_zmq_address
from gpukv.zmq_context import OwnedContext


def open_pub(owned: OwnedContext, address: str, *, allow_remote: bool = False,
             key_file: str | None = None, sndhwm: int = 100_000
             ) -> tuple[zmq.Socket, CurveServer | None, str]:
    """``(socket, curve, bound address)``: a protected XPUB socket of ``owned`` bound to
    ``address`` (see the module docstring). ``curve`` (tcp:// only) must be stopped before the
    context is closed. ValueError / ``zmq.ZMQError`` naming a refused address (nothing is left
    open then)."""
    check_zmq_address(address, allow_remote=allow_remote)
    if address.startswith("ipc://@"):
        raise ValueError(f"refusing the abstract socket {address!r}: any local user could subscribe")
    sock = owned.socket(zmq.XPUB)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.setsockopt(zmq.SNDHWM, sndhwm)
    sock.setsockopt(zmq.XPUB_VERBOSER, 1)  # see every (un)subscription
    curve = None
    try:
        if address.startswith("tcp://"):  # any local user can reach a port: CURVE
            curve = CurveServer(owned.ctx, load_keys(key_file, create=True))
            curve.secure(sock)
        bind(sock, address)  # ipc://: a trusted folder, this user's socket file
    except (zmq.ZMQError, ValueError):
        if curve is not None:
            curve.stop()
        owned.close_socket(sock)
        raise
    return sock, curve, sock.getsockopt(zmq.LAST_ENDPOINT).decode()


def subscription_delta(sock: zmq.Socket) -> int:
    """Read the (un)subscription frames waiting on an XPUB socket: subscriptions added minus
    removed (never blocks)."""
    delta = 0
    while sock.poll(0, zmq.POLLIN):
        frame = sock.recv()
        delta += 1 if frame[:1] == b"\x01" else -1 if frame[:1] == b"\x00" else 0
    return delta
