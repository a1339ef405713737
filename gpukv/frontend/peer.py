"""Who may bind and who answers: socket-path ownership for the server, peer uid for the client.

On ipc:// the operating system's users are the boundary (tcp:// adds CURVE keys:
:mod:`gpukv.curve_keys`). So the server binds only a path it owns in a folder no other user can
change (the default runtime folder, e.g. ``/tmp/gpukv-<uid>``, is created 0700), refuses
abstract ``ipc://@name`` sockets (no file permissions) unless explicitly allowed, and binds
tcp:// only on loopback unless ``allow_remote``. The client, before it sends anything (tokens
are user data), checks that the process listening on the address runs as its own user:
``SO_PEERCRED`` on ipc://, the owner of the listening socket in ``/proc/net/tcp{,6}`` on
loopback tcp://.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
from pathlib import Path

from gpukv.ops.addresses import tcp_listener_uid
from gpukv.private_paths import SOCKET_PATH_MAX, runtime_dir, trusted_folder

_LOOPBACK = ("127.0.0.1", "localhost", "[::1]", "::1")


def ipc_path(address: str) -> str:
    return address[len("ipc://"):]


def check_address(address: str, *, allow_remote: bool = False, allow_abstract: bool = False) -> str:
    """Validate a bind address: ``ipc://<path>`` or ``tcp://<loopback>:<port>``."""
    if address.startswith("ipc://"):
        path = ipc_path(address)
        if not path:
            raise ValueError(f"ipc address needs a path, got {address!r}")
        if path.startswith("@") and not allow_abstract:
            raise ValueError(f"refusing the abstract socket {address!r}: it has no file "
                             "permissions, so any local user could connect (pass allow_abstract)")
        return address
    if address.startswith("tcp://"):
        host = address[len("tcp://"):].rpartition(":")[0]
        if host not in _LOOPBACK and not allow_remote:
            raise ValueError(f"refusing to bind {address!r}: not a loopback address (the protocol "
                             "has no authentication); pass allow_remote to override")
        return address
    raise ValueError(f"address must be ipc://<path> or tcp://127.0.0.1:<port>, got {address!r}")


def prepare_socket_path(path: str) -> None:
    """Make sure the server may bind ``path``: every folder on its way is root's or this user's
    and, where others may write, sticky (:func:`gpukv.private_paths.trusted_folder`; the default
    runtime folder is created 0700), and an existing file there is this user's stale socket
    (removed) -- never another user's or a live server's."""
    if path.startswith("@"):
        return
    folder = Path(path).parent
    if folder == runtime_dir():
        runtime_dir(create=True)
    if len(os.fsencode(path)) > SOCKET_PATH_MAX:
        raise ValueError(f"socket path {path!r} is longer than {SOCKET_PATH_MAX} bytes: pass a "
                         "shorter ipc:// address")
    if not folder.is_dir():
        raise ValueError(f"socket folder {str(folder)!r} does not exist")
    try:
        folder = trusted_folder(folder)
    except ValueError as exc:
        raise ValueError(f"refusing to bind {path!r}: {exc}") from None
    target = folder / Path(path).name
    try:
        tst = target.lstat()
    except FileNotFoundError:
        return
    if tst.st_uid != os.getuid():
        raise ValueError(f"refusing to bind {path!r}: the file there belongs to uid {tst.st_uid}")
    if not stat.S_ISSOCK(tst.st_mode):
        raise ValueError(f"refusing to bind {path!r}: a non-socket file is in its place")
    if peer_uid(path) is not None:
        raise ValueError(f"another server is listening on ipc://{path}")
    target.unlink()


def bind(sock, address: str) -> None:
    """Bind a zmq socket to a checked ``address``: an ipc:// path only where
    :func:`prepare_socket_path` allows, the socket file this user's alone (umask 077)."""
    if not address.startswith("ipc://"):
        sock.bind(address)
        return
    prepare_socket_path(ipc_path(address))
    old = os.umask(0o077)  # only this user may connect
    try:
        sock.bind(address)
    finally:
        os.umask(old)


def peer_uid(path: str) -> int | None:
    """The uid of the process listening on a Unix socket path (None if nobody listens)."""
    name = "\0" + path[1:] if path.startswith("@") else path
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2.0)
        try:
            probe.connect(name)
        except OSError:
            return None
        creds = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


def server_uid(address: str) -> int | None:
    """The uid of the process listening on ``address`` (None: nobody listens on ipc:// or
    loopback tcp://, or a non-local tcp:// server whose user cannot be told: ``-1``)."""
    if address.startswith("ipc://"):
        return peer_uid(ipc_path(address))
    host, _, port = address[len("tcp://"):].rpartition(":")
    if host not in _LOOPBACK or not port.isdigit():
        return -1  # a remote server: the user chose it (allow_remote on the server side)
    return tcp_listener_uid(int(port))
