"""AdminServer over real sockets: the four routes, their errors, the loopback rule, bounds on
bodies and connections, and a server that answers the next request after any bad one."""

from __future__ import annotations

import errno
import http.client
import json
import socket
import subprocess
import sys
import time

import jsonschema
import pytest

from gpukv.ops.admin_http import AdminServer
from other_user import as_other_user, as_root, other_user_argv
from gpukv.ops.addresses import check_http_host, check_zmq_address, is_loopback_host
from gpukv.ops.metrics import CONTENT_TYPE, CacheMetrics
from gpukv.ops.status import SCHEMA_PATH, DeviceStatus, InstanceStatus, ModelStatus, Status, \
    TierStatus, json_schema


def status_doc() -> Status:
    return Status(version="0.1.0", uptime_s=12.5, chunk_size=256,
                  devices=[DeviceStatus("cpu", 1 << 30, 4 << 20, 16, 2)],
                  models=[ModelStatus("llama", "mha", [InstanceStatus("w0", 0, 2, "cpu"),
                                                       InstanceStatus("w1", 1, 2, "cpu")])],
                  clients=2, open_requests=3,
                  tiers=[TierStatus("L1", True), TierStatus("disk", False, "ENOSPC")])


class Owner:
    """The callables an engine or server would hand over, scripted."""

    def __init__(self) -> None:
        self.metrics = CacheMetrics()
        self.metrics.add_model("llama")
        self.cleared = 0
        self.clear_calls = 0
        self.status: object = status_doc()

    def clear(self) -> int:
        self.clear_calls += 1
        return self.cleared

    def get_status(self):
        if isinstance(self.status, Exception):
            raise self.status
        return self.status


@pytest.fixture
def owner() -> Owner:
    return Owner()


@pytest.fixture
def admin(owner):
    server = AdminServer(owner.metrics.render, status=owner.get_status, clear=owner.clear,
                         max_body_bytes=64, max_connections=4, request_timeout_s=5)
    with server:
        yield server


def request(admin: AdminServer, method: str, path: str, body: bytes | None = None,
            headers: dict | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection(admin.host, admin.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def raw(admin: AdminServer, data: bytes) -> bytes:
    """Send raw bytes, half-close, read the whole answer."""
    with socket.create_connection((admin.host, admin.port), timeout=10) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def probe(admin: AdminServer) -> bytes:
    """A GET /healthcheck on a fresh connection; b"" when the server closed it unanswered (which
    the client may see as a reset or a not-connected socket, depending on timing)."""
    try:
        return raw(admin, b"GET /healthcheck HTTP/1.0\r\n\r\n")
    except (ConnectionResetError, BrokenPipeError):
        return b""
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise
        return b""


def test_healthcheck_is_503_until_ready_then_200(admin):
    assert request(admin, "GET", "/healthcheck")[::2] == (503, b'{"ready": false}')
    admin.set_ready()
    assert request(admin, "GET", "/healthcheck")[::2] == (200, b'{"ready": true}')
    admin.set_ready(False)  # e.g. draining before shutdown
    assert request(admin, "GET", "/healthcheck")[0] == 503


def test_metrics_serves_the_current_exposition(admin, owner):
    owner.metrics.lookup("llama", 1024, {"L1": 768}, 1e-4)
    code, headers, body = request(admin, "GET", "/metrics")
    assert code == 200 and headers["Content-Type"] == CONTENT_TYPE
    assert b'gpukv_lookup_hit_tokens_total{model="llama",tier="L1"} 768.0' in body
    owner.metrics.lookup("llama", 256, {"L1": 256}, 1e-4)
    assert b'tier="L1"} 1024.0' in request(admin, "GET", "/metrics?x=1")[2]
    code, headers, body = request(admin, "HEAD", "/metrics")
    assert code == 200 and body == b"" and int(headers["Content-Length"]) > 0


def test_status_json_validates_against_the_shipped_schema(admin):
    schema = json.loads(SCHEMA_PATH.read_text())
    assert schema == json.loads(json.dumps(json_schema()))  # the file matches the Structs
    code, headers, body = request(admin, "GET", "/status")
    assert code == 200 and headers["Content-Type"] == "application/json"
    doc = json.loads(body)
    jsonschema.validate(doc, schema)
    assert doc["models"][0]["instances"][1] == {"instance_id": "w1", "tp_rank": 1, "tp_size": 2,
                                                "device": "cpu"}
    assert doc["tiers"][1] == {"name": "disk", "healthy": False, "detail": "ENOSPC"}
    for broken in ({**doc, "clients": -1}, {**doc, "extra": 1},
                   {k: v for k, v in doc.items() if k != "version"},
                   {**doc, "tiers": [{"name": "L2", "healthy": True, "detail": ""}]}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema)


def test_a_status_dict_is_validated_and_a_bad_one_is_a_500(admin, owner):
    owner.status = json.loads(request(admin, "GET", "/status")[2])  # a plain dict is fine
    assert request(admin, "GET", "/status")[0] == 200
    owner.status = {**owner.status, "open_requests": -4}
    code, _, body = request(admin, "GET", "/status")
    assert code == 500 and b"open_requests" in body
    owner.status = RuntimeError("engine closed")
    code, _, body = request(admin, "GET", "/status")
    assert code == 500 and json.loads(body) == {"error": "RuntimeError: engine closed"}
    assert request(admin, "GET", "/healthcheck")[0] == 503  # still serving


def test_clear_calls_the_owner_once_and_returns_the_count(admin, owner):
    owner.cleared = 7
    assert request(admin, "POST", "/clear")[::2] == (200, b'{"cleared": 7}')
    assert request(admin, "POST", "/clear", body=b"{}",
                   headers={"Content-Type": "application/json"})[0] == 200
    assert owner.clear_calls == 2
    owner.cleared = "seven"
    assert request(admin, "POST", "/clear")[0] == 500
    assert owner.clear_calls == 3


def test_clear_refuses_a_cross_site_browser_request(admin, owner):
    code, _, body = request(admin, "POST", "/clear", headers={"Origin": "https://evil.example"})
    assert code == 403 and owner.clear_calls == 0
    assert request(admin, "POST", "/clear", headers={"Origin": admin.url})[0] == 200
    assert owner.clear_calls == 1


@pytest.mark.parametrize("method, path, code, allow", [
    ("GET", "/nope", 404, None),
    ("GET", "/", 404, None),
    ("GET", "/metrics/", 404, None),
    ("POST", "/metrics", 405, "GET, HEAD"),
    ("DELETE", "/status", 405, "GET, HEAD"),
    ("GET", "/clear", 405, "POST"),
    ("PUT", "/clear", 405, "POST"),
    ("BREW", "/healthcheck", 405, "GET, HEAD"),
])
def test_unknown_routes_are_404_and_wrong_methods_405(admin, owner, method, path, code, allow):
    got, headers, body = request(admin, method, path)
    assert got == code and headers.get("Allow") == allow
    assert "error" in json.loads(body)
    assert owner.clear_calls == 0


def test_bodies_are_bounded_and_bad_framing_is_refused(admin, owner):
    assert request(admin, "POST", "/clear", body=b"x" * 65)[0] == 413
    assert request(admin, "GET", "/metrics", body=b"x" * 1000)[0] == 413
    assert raw(admin, b"POST /clear HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\nhello\r\n0\r\n\r\n").startswith(b"HTTP/1.0 411")
    assert raw(admin, b"POST /clear HTTP/1.1\r\nContent-Length: -5\r\n\r\n").startswith(
        b"HTTP/1.0 400")
    assert raw(admin, b"POST /clear HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc") == b""  # cut off
    assert owner.clear_calls == 0


@pytest.mark.parametrize("junk, code", [
    (b"\x00\x01\x02garbage\r\n\r\n", b"400"),
    (b"GET\r\n\r\n", b"400"),
    (b"GET /metrics HTTP/9.9\r\n\r\n", b"505"),
    (b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n", b"431"),  # too many headers
    (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", b"414"),             # line too long
    (b"", b""),
])
def test_a_malformed_request_never_takes_the_server_down(admin, junk, code):
    answer = raw(admin, junk)
    assert answer[len(b"HTTP/1.0 "):][:3] == code
    if answer:
        assert "error" in json.loads(answer.partition(b"\r\n\r\n")[2])
    assert request(admin, "GET", "/healthcheck")[0] == 503


def test_a_slow_client_does_not_block_others_and_connections_are_bounded(owner):
    with AdminServer(owner.metrics.render, max_connections=2, request_timeout_s=30) as admin:
        idle = [socket.create_connection((admin.host, admin.port), timeout=10) for _ in range(2)]
        for sock in idle:
            sock.sendall(b"GET /metr")  # half a request line: holds a slot
        # a third connection finds both slots taken: closed unanswered
        assert probe(admin) == b""
        for sock in idle:
            sock.close()  # their handlers see EOF and free the slots
        deadline = time.monotonic() + 30  # the freed slots come back once the handler threads end
        while not (answer := probe(admin)) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert answer.startswith(b"HTTP/1.0 503")


def test_optional_routes_are_404_when_not_given(owner):
    with AdminServer(owner.metrics.render) as admin:
        assert request(admin, "GET", "/status")[0] == 404
        assert request(admin, "POST", "/clear")[0] == 404
        assert json.loads(request(admin, "GET", "/x")[2])["routes"] == ["GET /metrics",
                                                                        "GET /healthcheck"]


def test_binding_is_loopback_unless_allowed(owner):
    for host in ("0.0.0.0", "::", "192.168.1.20", "10.0.0.1", "example.com", ""):
        with pytest.raises(ValueError):
            AdminServer(owner.metrics.render, host=host)
    assert check_http_host("0.0.0.0", allow_remote=True) == "0.0.0.0"
    assert all(is_loopback_host(h) for h in ("127.0.0.1", "127.8.9.10", "localhost", "::1", "[::1]"))
    assert check_zmq_address("tcp://127.0.0.1:*") == "tcp://127.0.0.1:*"
    for address in ("tcp://0.0.0.0:5555", "tcp://example.com:1", "tcp://127.0.0.1", "udp://x",
                    "ipc://"):
        with pytest.raises(ValueError):
            check_zmq_address(address)
    assert check_zmq_address("tcp://0.0.0.0:5555", allow_remote=True)
    with AdminServer(owner.metrics.render, host="localhost") as admin:
        assert admin.host == "127.0.0.1" and request(admin, "GET", "/metrics")[0] == 200


def test_ipv6_loopback(owner):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        admin = AdminServer(owner.metrics.render, host="::1")
    except OSError as exc:
        pytest.skip(f"cannot bind ::1: {exc}")
    with admin:
        assert admin.url == f"http://[::1]:{admin.port}"
        assert request(admin, "GET", "/metrics")[0] == 200


def test_bad_construction_arguments_and_lifecycle(owner):
    with pytest.raises(TypeError):
        AdminServer(b"metrics")
    with pytest.raises(TypeError):
        AdminServer(owner.metrics.render, status={"version": "x"})
    for kwargs in ({"port": 70000}, {"port": -1}, {"max_body_bytes": 0}, {"max_connections": 0},
                   {"request_timeout_s": 0}):
        with pytest.raises(ValueError):
            AdminServer(owner.metrics.render, **kwargs)
    admin = AdminServer(owner.metrics.render).start()
    with pytest.raises(RuntimeError):
        admin.start()
    admin.stop()
    admin.stop()
    with pytest.raises(OSError):
        socket.create_connection((admin.host, admin.port), timeout=2).close()


# ---- another local user (issue 24 row 4) --------------------------------------------------------
NEIGHBOUR_REQUESTS = """
import sys, urllib.request, urllib.error
codes = []
for method, path in (("GET", "/healthcheck"), ("GET", "/status"), ("GET", "/metrics"),
                     ("POST", "/clear")):
    request = urllib.request.Request(sys.argv[1] + path, method=method,
                                     data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            codes.append(resp.status)
    except urllib.error.HTTPError as exc:
        codes.append(exc.code)
print(*codes)
"""


@as_root
def test_another_user_reads_only_the_healthcheck_and_cannot_clear(owner):
    """Before: any local user read /status and /metrics and POST /clear dropped objects."""
    token = "t" * 32
    with AdminServer(owner.metrics.render, status=owner.get_status, clear=owner.clear,
                     token=token) as admin:
        admin.set_ready()
        seen = as_other_user(sys.executable, "-c", NEIGHBOUR_REQUESTS, admin.url)
        assert seen.stdout.split() == ["200", "401", "401", "401"], seen.stderr[-2000:]
        assert owner.clear_calls == 0
        headers = {"Authorization": f"Bearer {token}"}
        assert request(admin, "GET", "/status", headers=headers)[0] == 200
        assert request(admin, "POST", "/clear", headers=headers)[0] == 200
        assert owner.clear_calls == 1


SLOW_NEIGHBOUR = """
import json, socket, sys, time
socks = [socket.create_connection(("127.0.0.1", int(sys.argv[1]))) for _ in range(16)]
print("open", flush=True)
t0, closed = time.monotonic(), {}
while time.monotonic() - t0 < float(sys.argv[2]) and len(closed) < len(socks):
    for i, sock in enumerate(socks):
        if i in closed:
            continue
        try:
            sock.send(b"G")  # one byte of a request line that never ends
            sock.setblocking(False)
            try:
                if sock.recv(1) == b"":
                    closed[i] = time.monotonic() - t0
            except BlockingIOError:
                pass
            sock.setblocking(True)
        except OSError:
            closed[i] = time.monotonic() - t0
    time.sleep(1.0)
print(json.dumps(sorted(closed.values())), flush=True)
"""


@as_root
def test_another_users_slow_clients_cannot_take_every_slot(owner):
    """Before: 16 connections sending a byte every 2 s held all 16 slots for ever (the timeout
    was per read). Now another user holds at most a quarter of them, each for one whole-request
    deadline, and this user's request is answered meanwhile."""
    with AdminServer(owner.metrics.render, max_connections=16, request_timeout_s=3) as admin:
        admin.set_ready()
        neighbour = subprocess.Popen(other_user_argv(sys.executable, "-c", SLOW_NEIGHBOUR,
                                                     admin.port, 12),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert neighbour.stdout.readline().strip() == "open"
            t0 = time.monotonic()
            answer = probe(admin)
            assert answer.startswith(b"HTTP/1.0 200"), answer
            assert time.monotonic() - t0 < 2.0
            out, err = neighbour.communicate(timeout=60)
            closed = json.loads(out.strip().splitlines()[-1])
            assert len(closed) == 16, (out, err[-2000:])  # every one cut, none held
            assert max(closed) < 3 + 2 + 2  # the deadline, one trickle period, slack
        finally:
            neighbour.kill()
            neighbour.wait()


def test_a_trickling_client_is_cut_at_its_whole_request_deadline(owner):
    with AdminServer(owner.metrics.render, request_timeout_s=1.5) as admin:
        with socket.create_connection((admin.host, admin.port), timeout=10) as sock:
            t0 = time.monotonic()
            got = b""
            while time.monotonic() - t0 < 10:
                try:
                    sock.sendall(b"G")
                except OSError:
                    break
                sock.settimeout(0.3)
                try:
                    got = sock.recv(65536)
                    if not got or got.startswith(b"HTTP"):
                        break
                except socket.timeout:
                    pass
            assert time.monotonic() - t0 < 1.5 + 1.5  # cut at the deadline, not per read


def test_a_token_guards_every_route_but_the_healthcheck(owner):
    with AdminServer(owner.metrics.render, status=owner.get_status, clear=owner.clear,
                     token="s" * 24) as admin:
        for method, path in (("GET", "/metrics"), ("GET", "/status"), ("POST", "/clear")):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s" * 24},
                            {"Authorization": "Basic " + "s" * 24}):
                code, got_headers, _ = request(admin, method, path, headers=headers)
                assert code == 401 and got_headers["WWW-Authenticate"].startswith("Bearer")
            ok = request(admin, method, path, headers={"Authorization": "bearer " + "s" * 24})
            assert ok[0] == 200
        assert request(admin, "GET", "/healthcheck")[0] == 503  # open, and not ready yet
        assert owner.clear_calls == 1
    with pytest.raises(ValueError, match="at least 16"):
        AdminServer(owner.metrics.render, token="short")


def test_the_serve_token_file_is_made_once_private_and_never_read_through_a_link(tmp_path):
    from gpukv.frontend.admin import admin_token

    token, path = admin_token(tmp_path / "admin.token")
    assert len(token) >= 32 and oct(path.stat().st_mode & 0o777) == "0o600"
    assert admin_token(path) == (token, path)  # made once
    (tmp_path / "link.token").symlink_to(path)
    with pytest.raises(ValueError, match="a link is in its place"):
        admin_token(tmp_path / "link.token")
    (tmp_path / "empty.token").write_text("\n")
    with pytest.raises(ValueError, match="holds no token"):
        admin_token(tmp_path / "empty.token")
