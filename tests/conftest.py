"""Shared fixtures: a real ``redis-server`` on a free 127.0.0.1 port, started and stopped per test.

Without ``redis-server`` on PATH (or the ``redis`` package) the tests that use it are skipped,
unless ``GPUKV_REQUIRE_REDIS=1`` (CI), in which case they fail. ``GPUKV_REDIS_SERVER`` names
another server binary (e.g. ``valkey-server``) to run the same tests against.
"""

from __future__ import annotations

import os

# The Triton kernels run on CPU tensors only under the interpreter, which must be chosen before
# triton is imported anywhere in the session (GPU runs set GPUKV_TRITON_COMPILED=1).
if os.environ.get("GPUKV_TRITON_COMPILED") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

READY_TIMEOUT_S = 10.0


def server_binary() -> str:
    return os.environ.get("GPUKV_REDIS_SERVER", "redis-server")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def require_redis() -> None:
    """Skip (or fail, with ``GPUKV_REQUIRE_REDIS=1``) when the server or client is missing."""
    missing = []
    if shutil.which(server_binary()) is None:
        missing.append(f"{server_binary()} not on PATH (apt-get install redis-server)")
    try:
        import redis  # noqa: F401
    except ImportError:
        missing.append("python package 'redis' not installed (pip install redis hiredis)")
    if missing:
        reason = "; ".join(missing)
        if os.environ.get("GPUKV_REQUIRE_REDIS") == "1":
            pytest.fail(f"GPUKV_REQUIRE_REDIS=1 but {reason}")
        pytest.skip(reason)


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1 that a test can stop, restart and pause.

    ``extra_args`` are appended to the command line (e.g. ``["--requirepass", "pw"]``). With
    ``tls`` (a dict of ``cert``/``key``/``ca`` paths) the server listens with TLS only.
    """

    def __init__(self, workdir: Path, *, password: str | None = None, unixsocket: bool = False,
                 tls: dict[str, str] | None = None, cluster: bool = False,
                 extra_args: list[str] | None = None) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.password = password
        self.unixsocket = workdir / "redis.sock" if unixsocket else None
        self.tls = tls
        self.cluster = cluster
        self.cluster_port = free_port() if cluster else None  # the bus; port + 10000 may be > 65535
        self.extra_args = list(extra_args or [])
        self.proc: subprocess.Popen | None = None
        self.paused = False
        self.log_path = workdir / "redis.log"

    @property
    def url(self) -> str:
        """``redis://`` (or ``rediss://``) URL with the password, database 0."""
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            return (f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls['ca']}"
                    "&ssl_cert_reqs=required")
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        args = [server_binary(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.workdir), "--logfile", str(self.log_path),
                "--maxmemory", "1gb", "--maxmemory-policy", "allkeys-lru"]
        if self.tls:
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file",
                     self.tls["cert"], "--tls-key-file", self.tls["key"], "--tls-ca-cert-file",
                     self.tls["ca"], "--tls-auth-clients", "no"]
        else:
            args += ["--port", str(self.port)]
        if self.password:
            args += ["--requirepass", self.password]
        if self.unixsocket:
            args += ["--unixsocket", str(self.unixsocket), "--unixsocketperm", "700"]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-port", str(self.cluster_port),
                     "--cluster-config-file", str(self.workdir / "nodes.conf")]
        return args + self.extra_args

    def client(self):
        """A plain redis-py client for inspecting and tampering with what the tier wrote."""
        import redis

        if self.tls:
            return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, ssl=True,
                               ssl_ca_certs=self.tls["ca"], socket_timeout=5)
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password,
                           socket_timeout=5)

    def start(self) -> None:
        """Start on ``self.port`` (the same port after a stop) and wait until it answers PING."""
        import redis

        assert self.proc is None, "already running"
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                log = self.log_path.read_text() if self.log_path.exists() else ""
                self.proc = None
                raise RuntimeError(f"{server_binary()} exited at start:\n{log[-2000:]}")
            try:
                if self.client().ping():
                    break
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} not ready in time")
            time.sleep(0.02)
        if self.cluster:
            self._assign_all_slots()

    def _assign_all_slots(self) -> None:
        client = self.client()
        if b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
            assert time.monotonic() < deadline, "one-node cluster did not reach state ok"
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the server (SIGCONT first if paused); waits for the process to exit."""
        if self.proc is None:
            return
        if self.paused:
            self.resume()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets but answers nothing (a "slow" remote)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """``make(**options) -> RedisServer`` (started); every server is stopped at teardown."""
    require_redis()
    servers: list[RedisServer] = []

    def make(**options) -> RedisServer:
        workdir = tmp_path / f"redis{len(servers)}"
        workdir.mkdir()
        server = RedisServer(workdir, **options)
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def redis_server(redis_factory: Callable[..., RedisServer]) -> RedisServer:
    """A fresh password-less ``redis-server``; ``.url`` is its ``redis://`` URL."""
    return redis_factory()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def delay_proxy(redis_server: RedisServer):
    """A ``DelayProxy`` (tests/tcp_proxy.py) in front of ``redis_server``: set ``delay_s`` to
    make the server slow; ``turns`` counts round trips independently of the client."""
    from tcp_proxy import DelayProxy

    proxy = DelayProxy(redis_server.port)
    yield proxy
    proxy.close()
