"""The HTTP admin endpoint (standard library only): a ``ThreadingHTTPServer`` in a daemon thread.

    GET  /metrics      Prometheus text exposition (the ``metrics`` callable's bytes)
    GET  /healthcheck  503 ``{"ready": false}`` until :meth:`AdminServer.set_ready`, then 200
    GET  /status       the :class:`gpukv.ops.status.Status` JSON the ``status`` callable returns
    POST /clear        calls ``clear()`` (drop unlocked L1 objects): ``{"cleared": <int>}``

HEAD is answered wherever GET is. Unknown paths get 404, known paths with another method 405
(with ``Allow``), a body over ``max_body_bytes`` 413, a chunked body 411; a callable that raises
gets a 500 naming the error and the server lives on. Every answer is JSON except /metrics, and
every connection closes after one response (HTTP/1.0), so no idle keep-alive holds a thread.

Who may ask: with a ``token``, every route but /healthcheck (which tells only "ready") needs
``Authorization: Bearer <token>`` (401 otherwise): the counters, model names and clients of
/metrics and /status are information, and /clear changes the cache. Without one (a library
user's own endpoint) every route is open to whoever reaches the port. POST /clear also refuses a
browser's cross-site request (an ``Origin`` header whose host is not loopback).

Slow clients (:mod:`gpukv.ops.http_bounds`): at most ``max_connections`` requests at once, a
quarter of them for one other local user or remote address, each within ``request_timeout_s``
for the whole request and answer. Binding a non-loopback host needs ``allow_remote=True``.
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Callable
from urllib.parse import urlsplit

from gpukv.ops.addresses import check_http_host, is_loopback_host
from gpukv.ops.http_bounds import BoundedHTTPServer
from gpukv.ops.metrics import CONTENT_TYPE
from gpukv.ops.status import Status, encode_status

log = logging.getLogger(__name__)

ROUTES = {"/metrics": "GET", "/healthcheck": "GET", "/status": "GET", "/clear": "POST"}
JSON_TYPE = "application/json"


class _Handler(BaseHTTPRequestHandler):
    server: BoundedHTTPServer
    server_version = "gpukv-admin"
    default_request_version = "HTTP/1.0"  # a status line even for a garbled request line

    def setup(self) -> None:
        self.timeout = self.server.admin.request_timeout_s
        super().setup()

    def __getattr__(self, name: str):
        if name.startswith("do_"):  # every method reaches the router (405, not 501)
            return self._dispatch
        raise AttributeError(name)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        log.debug("admin %s: " + format, self.address_string(), *args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The base class's errors (bad request line, headers, version) as JSON too."""
        self.close_connection = True
        self._json(code, {"error": message or HTTPStatus(code).phrase})

    def _send(self, code: int, body: bytes, content_type: str = JSON_TYPE,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, code: int, document: dict, headers: dict[str, str] | None = None) -> None:
        self._send(code, json.dumps(document).encode(), JSON_TYPE, headers)

    def _dispatch(self) -> None:
        path = urlsplit(self.path).path
        method = ROUTES.get(path)
        admin = self.server.admin
        if method is None or (path == "/status" and admin.status is None) or (
                path == "/clear" and admin.clear is None):
            self._json(404, {"error": f"no route {path!r}", "routes": admin.routes()})
            return
        if path != "/healthcheck" and not admin.authorized(self.headers.get("Authorization")):
            self._json(401, {"error": f"{path} needs Authorization: Bearer <token> (the token "
                                      "file of gpukv serve --http-token-file)"},
                       {"WWW-Authenticate": 'Bearer realm="gpukv"'})
            return
        allowed = ("GET", "HEAD") if method == "GET" else (method,)
        if self.command not in allowed:
            self._json(405, {"error": f"{self.command} not allowed on {path}"},
                       {"Allow": ", ".join(allowed)})
            return
        if not self._read_body(admin.max_body_bytes):
            return
        try:
            if path == "/metrics":
                self._send(200, admin.metrics(), CONTENT_TYPE)
            elif path == "/healthcheck":
                self._json(200 if admin.ready else 503, {"ready": admin.ready})
            elif path == "/status":
                self._send(200, encode_status(admin.status()))
            else:
                self._clear(admin)
        except Exception as exc:  # noqa: BLE001 - a failing callable is a 500, never a dead server
            log.warning("admin %s %s failed", self.command, path, exc_info=True)
            self._json(500, {"error": f"{type(exc).__name__}: {exc}"})

    def _read_body(self, limit: int) -> bool:
        """Read and discard a bounded body; answer and return False when it is refused."""
        if self.headers.get("Transfer-Encoding"):
            self._json(411, {"error": "send a Content-Length body, not a chunked one"})
            return False
        raw = self.headers.get("Content-Length", "0").strip()
        if not raw.isdigit():
            self._json(400, {"error": f"bad Content-Length {raw[:40]!r}"})
            return False
        length = int(raw)
        if length > limit:
            self._json(413, {"error": f"body of {length} bytes exceeds {limit}"})
            return False
        body = self.rfile.read(length) if length else b""
        if len(body) != length:
            self.close_connection = True
            return False  # the client went away mid-body: nothing to answer
        return True

    def _clear(self, admin: "AdminServer") -> None:
        origin = self.headers.get("Origin")
        if origin is not None and not is_loopback_host(urlsplit(origin).hostname or ""):
            self._json(403, {"error": f"cross-site request from {origin[:80]!r} refused"})
            return
        cleared = admin.clear()
        if isinstance(cleared, bool) or not isinstance(cleared, int) or cleared < 0:
            raise TypeError(f"clear() must return an int >= 0, got {cleared!r}")
        self._json(200, {"cleared": cleared})


class AdminServer:
    """The admin HTTP endpoint, bound at construction and served after :meth:`start`.

    ``metrics() -> bytes`` (e.g. :meth:`CacheMetrics.render`), ``status() -> Status | dict``
    (validated against :class:`Status`; ``None``: no /status route), ``clear() -> int`` (objects
    cleared; ``None``: no /clear route). ``port=0`` picks a free port (see :attr:`port`).
    """

    def __init__(self, metrics: Callable[[], bytes], *, status: Callable[[], Status | dict] | None = None,
                 clear: Callable[[], int] | None = None, host: str = "127.0.0.1", port: int = 0,
                 allow_remote: bool = False, max_body_bytes: int = 4096,
                 max_connections: int = 16, request_timeout_s: float = 10.0,
                 token: str | None = None) -> None:
        for name, fn in (("metrics", metrics), ("status", status), ("clear", clear)):
            if not callable(fn) and not (fn is None and name != "metrics"):
                raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
        check_http_host(host, allow_remote=allow_remote)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be an int in [0, 65535], got {port!r}")
        for name, value in (("max_body_bytes", max_body_bytes), ("max_connections", max_connections)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(request_timeout_s, (int, float)) or not request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be positive, got {request_timeout_s!r}")
        if token is not None and (not isinstance(token, str) or len(token) < 16):
            raise ValueError("token must be a str of at least 16 characters")
        self.metrics, self.status, self.clear = metrics, status, clear
        self._token = token.encode() if token is not None else None
        self.token_file = None  # where the token came from, when its owner says
        self.max_body_bytes, self.max_connections = max_body_bytes, max_connections
        self.max_per_peer = max(1, max_connections // 4)
        self.request_timeout_s = float(request_timeout_s)
        self._ready = threading.Event()
        bind_host = "127.0.0.1" if host == "localhost" else host.strip("[]")
        family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
        self._httpd = BoundedHTTPServer((bind_host, port), self, family, _Handler)
        self.host, self.port = self._httpd.server_address[:2]
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def url(self) -> str:
        """``http://host:port`` of the bound socket."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def target(self) -> str:
        """``host:port`` as a Prometheus scrape target names it."""
        return self.url[len("http://"):]

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def set_ready(self, ready: bool = True) -> None:
        """Mark the owner ready (/healthcheck 200) or not (503, e.g. while shutting down)."""
        if ready:
            self._ready.set()
        else:
            self._ready.clear()

    def authorized(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header carries the token (always, without a token)."""
        if self._token is None:
            return True
        scheme, _, credentials = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            credentials.strip().encode(), self._token)

    def routes(self) -> list[str]:
        return [f"{m} {p}" for p, m in ROUTES.items()
                if not (p == "/status" and self.status is None)
                and not (p == "/clear" and self.clear is None)]

    def start(self) -> "AdminServer":
        """Serve in a daemon thread; returns self."""
        if self._thread is not None:
            raise RuntimeError("AdminServer already started")
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="gpukv-admin", daemon=True)
        self._thread.start()
        self._watchdog = threading.Thread(target=self._cut_overdue, name="gpukv-admin-deadline",
                                          daemon=True)
        self._watchdog.start()
        return self

    def _cut_overdue(self) -> None:
        every = min(0.25, self.request_timeout_s / 4)
        while not self._stopping.wait(every):
            self._httpd.cut_overdue()

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        self._stopping.set()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        if self._watchdog is not None:
            self._watchdog.join()
            self._watchdog = None
        self._httpd.server_close()

    def __enter__(self) -> "AdminServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
