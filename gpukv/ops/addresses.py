"""The loopback rule (binding anything but a loopback address needs an explicit
``allow_remote``; shared by the HTTP admin port and the event socket), and who owns a TCP socket
on this machine (``/proc/net/tcp{,6}``: the uid of a listener, or of a connection's other end).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from pathlib import Path

_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
LISTEN = "0A"


def _proc_address(host: str, port: int) -> str | None:
    """``host:port`` as /proc/net/tcp{,6} writes it (32-bit words in host order, hex)."""
    host = host.strip("[]")
    try:
        packed = socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        return None
    words = struct.unpack(f"={len(packed) // 4}I", packed)
    return "".join(f"{w:08X}" for w in words) + f":{port:04X}"


def _sockets():
    """(local, remote, state, uid) of every TCP socket of this network namespace."""
    for table in _TABLES:
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            yield fields[1], fields[2], fields[3], int(fields[7])


def tcp_listener_uid(port: int) -> int | None:
    """The uid owning the socket listening on TCP ``port``, or None when none is seen."""
    want = f":{port:04X}"
    return next((uid for local, _, state, uid in _sockets()
                 if state == LISTEN and local.endswith(want)), None)


def tcp_socket_uid(local: tuple, remote: tuple) -> int | None:
    """The uid owning the TCP socket whose own address is ``local`` (host, port) and whose peer
    is ``remote``: e.g. who opened a connection a server accepted (pass the connection's peer
    address, then the server's). None when it is not on this machine (or cannot be told)."""
    want_local, want_remote = _proc_address(*local[:2]), _proc_address(*remote[:2])
    if want_local is None or want_remote is None:
        return None
    want_local, want_remote = want_local.upper(), want_remote.upper()
    return next((uid for loc, rem, _, uid in _sockets()
                 if loc == want_local and rem == want_remote), None)


def is_loopback_host(host: str) -> bool:
    """True for ``localhost``, any 127.0.0.0/8 address and ``::1`` (brackets allowed)."""
    if not isinstance(host, str):
        raise TypeError(f"host must be a str, got {type(host).__name__}")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


def check_http_host(host: str, *, allow_remote: bool = False) -> str:
    """``host`` if it may be bound; ``ValueError`` for a non-loopback host without allow_remote."""
    if not isinstance(host, str) or not host:
        raise ValueError(f"host must be a non-empty str, got {host!r}")
    if not allow_remote and not is_loopback_host(host):
        raise ValueError(f"refusing to bind {host!r}: not a loopback address (the admin endpoint "
                         "has no authentication); pass allow_remote=True to override")
    return host


def check_zmq_address(address: str, *, allow_remote: bool = False) -> str:
    """Validate a bind address: ``ipc://<path>`` or ``tcp://<loopback>:<port or *>``."""
    if not isinstance(address, str):
        raise TypeError(f"address must be a str, got {type(address).__name__}")
    if address.startswith("ipc://"):
        if not address[len("ipc://"):]:
            raise ValueError(f"ipc address needs a path, got {address!r}")
        return address
    if address.startswith("tcp://"):
        host, sep, port = address[len("tcp://"):].rpartition(":")
        if not sep or not host or not (port == "*" or port.isdigit()):
            raise ValueError(f"tcp address must be tcp://<host>:<port>, got {address!r}")
        if not allow_remote and not is_loopback_host(host):
            raise ValueError(f"refusing to bind {address!r}: not a loopback address (no "
                             "authentication); pass allow_remote=True to override")
        return address
    raise ValueError(f"address must be ipc://<path> or tcp://127.0.0.1:<port>, got {address!r}")
