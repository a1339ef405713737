"""The CURVE keys that guard gpukv's tcp:// sockets: the server's ROUTER and the KV events' PUB.

On ipc:// the operating system is the boundary (a 0600 socket in a private folder, the peer's
uid checked). A tcp:// port is open to every local user (and, with ``allow_remote``, the
network), so every tcp:// socket runs ZMQ's CURVE (libzmq's CurveZMQ: a handshake that proves
both keys, then every frame encrypted and authenticated) and a ZAP handler
(:class:`zmq.auth.thread.ThreadAuthenticator`) that admits one client key only. The keys live
in one key file, 0600, in this user's runtime folder (``gpukv.keys``; ``GPUKV_KEY_FILE`` names
another, e.g. a copy given to a router on another machine): whoever can read it may connect,
and no one else can even finish the handshake. The server creates it on first use.

Why CURVE rather than a token: a token sent in the clear (ZMQ PLAIN) would travel readable over
a network with ``allow_remote``, and the events (model names, chunk hashes) are meant for a
router that may sit on another machine; CURVE covers loopback and remote alike, from libzmq.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.auth.thread import ThreadAuthenticator

from gpukv.private_paths import open_private, runtime_dir

KEY_FILE_ENV = "GPUKV_KEY_FILE"
_FIELDS = ("server_public", "server_secret", "client_public", "client_secret")


@dataclass(frozen=True, slots=True)
class CurveKeys:
    """Z85-encoded CURVE key pairs (40 bytes each) of the server and of its clients."""

    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes


def key_file() -> Path:
    """``$GPUKV_KEY_FILE``, else ``<runtime folder>/gpukv.keys``."""
    return Path(os.environ.get(KEY_FILE_ENV) or runtime_dir() / "gpukv.keys")


def load_keys(path: str | os.PathLike | None = None, *, create: bool = False) -> CurveKeys:
    """The keys in ``path`` (default :func:`key_file`), made there first when ``create`` and
    missing. ValueError naming the file when it is unreadable, another user's, a link or bad."""
    if path is None:
        if create and not os.environ.get(KEY_FILE_ENV):
            runtime_dir(create=True)
        path = key_file()
    path = Path(path)
    if create and not path.exists():
        _write_new(path)
    try:
        fd = open_private(path, os.O_RDONLY)
    except ValueError as exc:
        raise ValueError(f"cannot read gpukv's tcp:// key file: {exc} (the server creates it "
                         f"at its first tcp:// start; {KEY_FILE_ENV} names another)") from None
    with os.fdopen(fd, "rb") as f:
        try:
            raw = json.loads(f.read(4096))
            keys = CurveKeys(*(raw[name].encode() for name in _FIELDS))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{path} is not a gpukv key file") from None
    for name in _FIELDS:
        if len(getattr(keys, name)) != 40:
            raise ValueError(f"{path}: {name} is not a Z85 CURVE key")
    return keys


def _write_new(path: Path) -> None:
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    blob = json.dumps(dict(zip(_FIELDS, (k.decode() for k in (
        server_public, server_secret, client_public, client_secret))))).encode()
    try:
        fd = open_private(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    except ValueError:
        if path.exists():  # another server made it meanwhile: use that one
            return
        raise
    with os.fdopen(fd, "wb") as f:
        f.write(blob)


class CurveServer:
    """CURVE on a server socket, and the ZAP handler (one thread per context) that admits only
    the key file's client key. :meth:`stop` before the context is terminated."""

    def __init__(self, ctx: zmq.Context, keys: CurveKeys) -> None:
        self.keys = keys
        self._auth = ThreadAuthenticator(ctx)
        self._auth.start()
        self._auth.configure_curve_callback("*", credentials_provider=self)

    def callback(self, domain: str, client_key: bytes) -> bool:
        """ZAP: admit the one client key of the key file."""
        return client_key == self.keys.client_public

    def secure(self, sock: zmq.Socket) -> None:
        """Make ``sock`` (before it binds) a CURVE server with this key file's server keys."""
        sock.curve_secretkey = self.keys.server_secret
        sock.curve_publickey = self.keys.server_public
        sock.curve_server = True

    def stop(self) -> None:
        self._auth.stop()


def secure_client(sock: zmq.Socket, keys: CurveKeys) -> None:
    """Make ``sock`` (before it connects) a CURVE client of the key file's server."""
    sock.curve_secretkey = keys.client_secret
    sock.curve_publickey = keys.client_public
    sock.curve_serverkey = keys.server_public
