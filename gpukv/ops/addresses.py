"""The loopback rule: gpukv's sockets have no authentication, so binding anything but a loopback
address needs an explicit ``allow_remote``. Shared by the HTTP admin port and the event socket."""

from __future__ import annotations

import ipaddress


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
