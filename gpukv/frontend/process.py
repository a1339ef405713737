"""``ServerProcess``: a ``gpukv serve`` child process for demos, tests and sweeps."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from gpukv.frontend.peer import check_address


class ServerProcess:
    """``python -m gpukv.cli serve`` as a child process.

    ``wait_ready()`` pings until it answers; ``stop()`` sends SIGTERM (SIGKILL after
    ``timeout_s``); also a context manager. ``extra_args`` go after ``serve``.
    """

    def __init__(self, address: str, *, capacity_bytes: int = 256 << 20, device: str = "cpu",
                 devices: str | None = None, chunk_size: int = 256,
                 disk_dir: str | os.PathLike | None = None, worker_timeout_s: float = 30.0,
                 threads: int = 4, log_level: str = "WARNING", ready_timeout_s: float = 120.0,
                 extra_args: list[str] | None = None) -> None:
        check_address(address)
        self.address = address
        self.argv = [sys.executable, "-m", "gpukv.cli", "--log-level", log_level, "serve",
                     "--address", address, "--capacity", str(capacity_bytes), "--device", device,
                     "--chunk-size", str(chunk_size), "--worker-timeout", str(worker_timeout_s),
                     "--threads", str(threads)]
        if devices:
            self.argv += ["--devices", devices]
        if disk_dir is not None:
            self.argv += ["--disk-dir", str(disk_dir)]
        self.argv += list(extra_args or [])
        self.proc = subprocess.Popen(self.argv)
        self.info = self.wait_ready(ready_timeout_s)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout_s: float) -> dict:
        """Ping until the server answers; ``RuntimeError`` if it exits or stays silent."""
        from gpukv.frontend.client import CacheClient, ServerUnavailable

        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gpukv serve exited with {self.proc.returncode}: {self.argv}")
            try:
                with CacheClient(self.address, connect_timeout_s=0.5, ping_interval_s=0) as client:
                    return client.server_info
            except ServerUnavailable:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"gpukv serve on {self.address} not ready in {timeout_s} s")
                time.sleep(0.05)

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s``; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
