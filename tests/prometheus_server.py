"""A real ``prometheus`` process for tests: scrapes given ``host:port`` targets every second and
answers PromQL over its HTTP API (``/api/v1/query``).

Skipped when the binary is missing, unless ``GPUKV_REQUIRE_PROMETHEUS=1`` (CI), in which case
the test fails. ``GPUKV_PROMETHEUS`` names another binary. Use the ``prometheus_factory``
fixture (import it into a test module, or move it to conftest.py): ``make(["127.0.0.1:9400"])``
returns a started :class:`PrometheusServer`; every one is stopped at teardown.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import pytest

START_TIMEOUT_S = 60.0


def prometheus_binary() -> str:
    return os.environ.get("GPUKV_PROMETHEUS", "prometheus")


def require_prometheus() -> None:
    """Skip (or fail, with ``GPUKV_REQUIRE_PROMETHEUS=1``) when the binary is missing."""
    if shutil.which(prometheus_binary()) is None:
        reason = f"{prometheus_binary()} not on PATH (apt-get install prometheus)"
        if os.environ.get("GPUKV_REQUIRE_PROMETHEUS") == "1":
            pytest.fail(f"GPUKV_REQUIRE_PROMETHEUS=1 but {reason}")
        pytest.skip(reason)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrometheusServer:
    """One ``prometheus`` on a free 127.0.0.1 port, its storage and config under ``workdir``."""

    def __init__(self, workdir: Path, targets: list[str], *, scrape_interval_s: int = 1,
                 credentials_file: str | None = None) -> None:
        for target in targets:
            host, _, port = target.rpartition(":")
            if host not in ("127.0.0.1", "localhost", "[::1]") or not port.isdigit():
                raise ValueError(f"targets must be loopback host:port, got {target!r}")
        self.workdir, self.targets = workdir, list(targets)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = workdir / "prometheus.yml"
        self.log_path = workdir / "prometheus.log"
        # JSON is YAML: no YAML library needed to write the config
        self.config_path.write_text(json.dumps({
            "global": {"scrape_interval": f"{scrape_interval_s}s",
                       "scrape_timeout": f"{scrape_interval_s}s",
                       "evaluation_interval": f"{scrape_interval_s}s"},
            "scrape_configs": [{"job_name": "gpukv", "metrics_path": "/metrics",
                                "static_configs": [{"targets": self.targets}],
                                **({"authorization": {"credentials_file": str(credentials_file)}}
                                   if credentials_file else {})}],
        }))
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        """Start and wait until ``/-/ready`` answers 200."""
        assert self.proc is None, "already running"
        argv = [prometheus_binary(), f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        self.poll_until(lambda: self._get("/-/ready") is not None, START_TIMEOUT_S,
                        "prometheus ready")

    def _get(self, path: str) -> bytes | None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log()}")
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as resp:
                return resp.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""

    def api(self, path: str, **params: str) -> object:
        """``data`` of a ``/api/v1/...`` answer; ``RuntimeError`` for an error status."""
        body = self._get(f"/api/v1/{path}?{urllib.parse.urlencode(params)}")
        if body is None:
            raise RuntimeError(f"prometheus API {path} did not answer")
        doc = json.loads(body)
        if doc.get("status") != "success":
            raise RuntimeError(f"prometheus API {path} failed: {doc}")
        return doc["data"]

    def query(self, expr: str) -> dict[tuple, float]:
        """Instant query: ``{sorted label items without __name__: value}``."""
        data = self.api("query", query=expr)
        return {tuple(sorted((k, v) for k, v in r["metric"].items() if k != "__name__")):
                float(r["value"][1]) for r in data["result"]}

    def targets_up(self) -> bool:
        active = self.api("targets", state="active")["activeTargets"]
        return len(active) == len(self.targets) and all(t["health"] == "up" for t in active)

    def poll_until(self, predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Call ``predicate`` every 0.1 s until true; ``TimeoutError`` naming ``what``."""
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not reached in {timeout_s} s\n{self.log()}")
            time.sleep(0.1)

    def wait_for(self, expr: str, expected: dict[tuple, float], timeout_s: float = 30.0) -> None:
        """Poll ``query(expr)`` until it equals ``expected`` (a later scrape may be needed)."""
        last: list[dict] = [{}]

        def matches() -> bool:
            last[0] = self.query(expr)
            return last[0] == expected

        try:
            self.poll_until(matches, timeout_s, f"query {expr!r}")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\nlast answer {last[0]}, expected {expected}") from None

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Callable[[list[str]], PrometheusServer]]:
    """``make(targets, credentials_file=None) -> PrometheusServer`` (started, scraping
    ``targets`` every second, with the bearer token of ``credentials_file`` when given)."""
    require_prometheus()
    servers: list[PrometheusServer] = []

    def make(targets: list[str], credentials_file: str | None = None) -> PrometheusServer:
        workdir = tmp_path / f"prometheus{len(servers)}"
        workdir.mkdir()
        server = PrometheusServer(workdir, targets, credentials_file=credentials_file)
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.stop()
