"""The tcp:// key file (:mod:`gpukv.curve_keys`): created once, 0600, never through a link; only
a client with its keys gets answers."""

from __future__ import annotations

import os
import stat

import pytest
import zmq

from gpukv.curve_keys import KEY_FILE_ENV, CurveServer, key_file, load_keys, secure_client


def test_the_key_file_is_made_once_private_and_read_back(tmp_path, monkeypatch):
    path = tmp_path / "gpukv.keys"
    monkeypatch.setenv(KEY_FILE_ENV, str(path))
    assert key_file() == path
    first = load_keys(create=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_keys() == first == load_keys(create=True)  # made once
    assert len({first.server_public, first.client_public, first.server_secret}) == 3
    path.chmod(0o644)
    assert load_keys(path) == first and stat.S_IMODE(path.stat().st_mode) == 0o600
    link = tmp_path / "link.keys"
    link.symlink_to(path)
    with pytest.raises(ValueError, match="a link is in its place"):
        load_keys(link)
    (tmp_path / "bad.keys").write_text("{}")
    with pytest.raises(ValueError, match="not a gpukv key file"):
        load_keys(tmp_path / "bad.keys")
    with pytest.raises(ValueError, match="cannot read gpukv's tcp:// key file"):
        load_keys(tmp_path / "missing.keys")


def test_only_the_key_files_client_key_is_answered(tmp_path):
    keys = load_keys(tmp_path / "gpukv.keys", create=True)
    ctx = zmq.Context()
    curve = CurveServer(ctx, keys)
    router = ctx.socket(zmq.ROUTER)
    try:
        curve.secure(router)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        address = f"tcp://127.0.0.1:{port}"
        replies = {}
        for name in ("keyed", "stranger", "plain"):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            if name == "keyed":
                secure_client(sock, keys)
            elif name == "stranger":  # knows the server's public key, not the client's secret
                public, secret = zmq.curve_keypair()
                sock.curve_publickey, sock.curve_secretkey = public, secret
                sock.curve_serverkey = keys.server_public
            sock.connect(address)
            sock.send(name.encode())
            while router.poll(1000):
                identity, body = router.recv_multipart()
                router.send_multipart([identity, b"re:" + body])
            replies[name] = sock.recv() if sock.poll(1000) else None
            sock.close()
        assert replies == {"keyed": b"re:keyed", "stranger": None, "plain": None}
    finally:
        router.close(0)
        curve.stop()
        ctx.term()
    assert os.path.exists(tmp_path / "gpukv.keys")
