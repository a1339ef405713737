"""Who may bind and who answers: the server refuses socket paths another user could control and
abstract sockets; the client refuses a server that runs as another user, before sending anything.

Other users are simulated as root can (chown, a forked child that drops to uid 65534); those cases
skip when the tests do not run as root.
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time

import pytest

import gpukv.frontend.client as client_module
from conftest import free_port
from frontend_cases import DIMS, N, STORE_BLOCKS, client, kv_cache, prompt, serving, slots_of
from gpukv.frontend.client import CacheClient, ServerUnavailable
from gpukv.frontend.peer import check_address, peer_uid, prepare_socket_path
from gpukv.frontend.protocol import default_address
from gpukv.frontend.server import ServerConfig
from other_user import OTHER_UID, as_other_user, as_root, point_at, shared_folder


@as_root
def test_refuses_a_folder_another_user_owns(tmp_path):
    folder = tmp_path / "theirs"
    folder.mkdir(mode=0o700)
    os.chown(folder, OTHER_UID, OTHER_UID)
    with pytest.raises(ValueError, match=f"owned by uid {OTHER_UID}"):
        prepare_socket_path(str(folder / "gpukv.sock"))
    with pytest.raises(ValueError, match=f"owned by uid {OTHER_UID}"):
        with serving(tmp_path, address=f"ipc://{folder}/gpukv.sock"):
            pass
    assert os.listdir(folder) == []


def test_refuses_a_world_writable_folder_without_the_sticky_bit(tmp_path):
    folder = tmp_path / "open"
    folder.mkdir()
    folder.chmod(0o777)
    with pytest.raises(ValueError, match="writable by other users"):
        prepare_socket_path(str(folder / "gpukv.sock"))
    folder.chmod(0o1777)  # like /tmp: others may create files but not replace ours
    with serving(tmp_path, address=f"ipc://{folder}/gpukv.sock") as server, \
            client(server.address) as c:
        assert c.ping()["pid"] == os.getpid()


@as_root
def test_refuses_a_path_where_another_users_file_sits(tmp_path):
    path = tmp_path / "gpukv.sock"
    path.write_bytes(b"")
    os.chown(path, OTHER_UID, OTHER_UID)
    with pytest.raises(ValueError, match=f"belongs to uid {OTHER_UID}"):
        prepare_socket_path(str(path))
    assert path.exists()  # never removed


def test_refuses_a_non_socket_file_and_a_live_server_but_replaces_a_stale_socket(tmp_path):
    path = tmp_path / "gpukv.sock"
    path.write_text("not a socket")
    with pytest.raises(ValueError, match="non-socket file"):
        prepare_socket_path(str(path))
    assert path.read_text() == "not a socket"
    path.unlink()
    with serving(tmp_path) as server:
        with pytest.raises(ValueError, match="another server is listening"):
            prepare_socket_path(str(path))
        mode = path.lstat().st_mode
        assert stat.S_ISSOCK(mode) and mode & 0o077 == 0  # only this user may connect
        assert server.address == f"ipc://{path}"
    stale = socket.socket(socket.AF_UNIX)  # a socket file nobody listens on any more
    stale.bind(str(path))
    stale.close()
    assert peer_uid(str(path)) is None
    with serving(tmp_path) as server, client(server.address) as c:
        assert c.ping()["pid"] == os.getpid()


def test_abstract_sockets_only_when_allowed(tmp_path):
    name = f"ipc://@gpukv-test-{os.getpid()}-{time.monotonic_ns()}"
    with pytest.raises(ValueError, match="abstract"):
        ServerConfig(address=name)
    with pytest.raises(ValueError, match="abstract"):
        check_address(name)
    with serving(tmp_path, address=name, allow_abstract=True) as server, client(name) as c:
        assert c.ping()["pid"] == os.getpid() and server.address == name


def test_only_loopback_tcp_unless_allowed():
    for address in ("tcp://0.0.0.0:5555", "tcp://10.1.2.3:5555", "tcp://*:5555", "udp://x", "ipc://"):
        with pytest.raises(ValueError, match="address|refusing"):
            ServerConfig(address=address)
    assert check_address("tcp://0.0.0.0:5555", allow_remote=True) == "tcp://0.0.0.0:5555"
    assert ServerConfig(address="tcp://127.0.0.1:5555").address.endswith(":5555")


def test_nobody_listening_raises_at_once(tmp_path):
    address = f"ipc://{tmp_path}/nobody.sock"
    t0 = time.monotonic()
    with pytest.raises(ServerUnavailable, match=address):
        CacheClient(address, connect_timeout_s=30)
    assert time.monotonic() - t0 < 5  # no connect timeout waited out (30 s)


def test_client_refuses_a_server_of_another_uid_before_sending(tmp_path, monkeypatch):
    with serving(tmp_path) as server:
        before = server.sessions.table.sids()
        monkeypatch.setattr(client_module, "server_uid", lambda address: OTHER_UID)
        with pytest.raises(ValueError, match=f"runs as uid {OTHER_UID}"):
            CacheClient(server.address)
        assert server.sessions.table.sids() == before  # it sent nothing


@as_root
def test_client_refuses_a_listener_running_as_another_user():
    folder = tempfile.mkdtemp(prefix="gpukv-other-user-")  # pytest's tmp_path is root-only
    os.chown(folder, OTHER_UID, OTHER_UID)
    path = os.path.join(folder, "gpukv.sock")
    ready_r, ready_w = os.pipe()
    stop_r, stop_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the other user's "server": counts the bytes it is sent
        try:
            os.setgid(OTHER_UID)
            os.setuid(OTHER_UID)
            listener = socket.socket(socket.AF_UNIX)
            listener.bind(path)
            listener.listen(8)
            os.write(ready_w, b"r")
            received = 0
            while True:
                ready, _, _ = select.select([listener, stop_r], [], [], 30)
                if stop_r in ready or not ready:
                    break
                conn, _ = listener.accept()
                conn.settimeout(2)
                try:
                    while chunk := conn.recv(65536):
                        received += len(chunk)
                except OSError:
                    pass
                conn.close()
            os.write(ready_w, str(received).encode())
        finally:
            os._exit(0)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"r"
        with pytest.raises(ValueError, match=f"runs as uid {OTHER_UID}"):
            CacheClient(f"ipc://{path}", connect_timeout_s=5)
    finally:
        os.write(stop_w, b"x")
        received = os.read(ready_r, 64)
        os.waitpid(pid, 0)
        shutil.rmtree(folder)
    assert received == b"0"  # the probe connected and sent nothing, zmq never connected


@as_root
def test_another_user_creating_the_default_folder_cannot_deny_the_server(tmp_path, monkeypatch):
    """Issue 24 row 3: another user creates ``<tmp>/gpukv-<uid>`` first. Before, ``gpukv serve``
    refused to start at its default address; now it binds in the fallback folder (in this
    user's home) and a client with the same environment finds it by the default address."""
    shared, home = shared_folder("gpukv-test-tmp-"), tmp_path / "home"
    home.mkdir(mode=0o700)
    as_other_user("mkdir", "-m", "0777", shared / f"gpukv-{os.getuid()}")
    env = point_at(monkeypatch, shared, home)
    proc = subprocess.Popen([sys.executable, "-m", "gpukv.cli", "--log-level", "WARNING", "serve",
                             "--capacity", "8MiB", "--chunk-size", "16"], env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        address = default_address()
        assert address == f"ipc://{home}/.cache/gpukv/run/gpukv.sock"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            try:
                with CacheClient(connect_timeout_s=0.5, ping_interval_s=0) as c:
                    assert c.server_info["pid"] == proc.pid
                    break
            except ServerUnavailable:
                assert time.monotonic() < deadline, "the server never answered"
                time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(shared)


NEIGHBOUR_LOOKUP = """
import sys, zmq
from gpukv.engine.keys import chunk_hashes, request_seed
from gpukv.frontend import protocol as p
sock = zmq.Context().socket(zmq.DEALER)
sock.setsockopt(zmq.LINGER, 0)
sock.connect(sys.argv[1])
def call(body):
    sock.send(p.encode_request(1, "n" * 32, body))
    if not sock.poll(3000):
        print("no reply")
        sys.exit(0)
    return p.decode_reply(sock.recv()).value
info = call(p.Ping())
tokens = [int(t) for t in sys.argv[2].split(",")]
hashes = chunk_hashes(tokens, info["chunk_size"], seed=request_seed(info["salt"], b""))
print("hit", call(p.Lookup("m", "probe", hashes, 1, None)))
"""


@as_root
def test_a_tcp_server_answers_no_other_local_user(tmp_path):
    """Issue 24 row 3: any local user could connect to a tcp://127.0.0.1 server and learn which
    prefixes are cached (before: "hit 80"). tcp:// runs CURVE now: without this user's key file
    the handshake never completes, and nothing is answered."""
    port = free_port()
    with serving(tmp_path, address=f"tcp://127.0.0.1:{port}") as server, \
            client(server.address) as c:
        pages, tokens = kv_cache("mla", 1), prompt(1)
        c.register("w", "m", pages, DIMS["mla"], kind="mla")
        assert c.store("w", tokens, slots_of(STORE_BLOCKS, len(tokens))) == N
        assert c.lookup("m", tokens, request_id="mine") == N  # this user's client: keys read
        seen = as_other_user(sys.executable, "-c", NEIGHBOUR_LOOKUP, server.address,
                             ",".join(map(str, tokens)))
        assert seen.stdout.strip() == "no reply", (seen.stdout, seen.stderr[-2000:])
        assert server.sessions.table.totals()["sessions"] == 1  # the neighbour never got in
