"""``gpukv serve``: one cache server process for every worker of a machine.

One ROUTER socket (clients use DEALER; see :mod:`gpukv.frontend.protocol`), and one thread, the loop,
touches it. The loop decodes each request and answers PING, FREE_LOOKUP_LOCKS, END_SESSION and
L1-only LOOKUPs itself (microseconds of bookkeeping); it hands REGISTER, STORE, RETRIEVE and FLUSH
to a *transfer* pool, and STATS, UNREGISTER and tier-touching LOOKUPs to a *control* pool, so a
long transfer never stalls a ping, a lookup or another worker. Pool threads put their replies on
a queue and wake the loop through a pipe it polls.

Client sessions, request ownership and reaping live in :mod:`gpukv.frontend.sessions`. A request that
fails gets an error reply naming the problem; the loop never dies of one.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from gpukv.frontend.protocol import (EndSession, FreeLookupLocks, Lookup, Ping, ProtocolError, Reply,
                            Request, Stats, Unregister, decode_request, default_address,
                            encode_reply, error_reply, ok_reply)
from gpukv.frontend.sessions import Sessions
from gpukv.frontend.shm import SHM_DIR, remove_stale

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 80 << 20
_INLINE = (Ping, FreeLookupLocks, EndSession)  # pure L1 bookkeeping: microseconds
_CONTROL = (Lookup, Stats, Unregister)
_LOOPBACK = ("127.0.0.1", "localhost", "[::1]", "::1")


def check_address(address: str, *, allow_remote: bool = False) -> str:
    """Validate a bind address: ``ipc://<path>`` or ``tcp://<loopback>:<port>``."""
    if address.startswith("ipc://"):
        if not address[len("ipc://"):]:
            raise ValueError(f"ipc address needs a path, got {address!r}")
        return address
    if address.startswith("tcp://"):
        host = address[len("tcp://"):].rpartition(":")[0]
        if host not in _LOOPBACK and not allow_remote:
            raise ValueError(f"refusing to bind {address!r}: not a loopback address (the protocol "
                             "has no authentication); pass allow_remote to override")
        return address
    raise ValueError(f"address must be ipc://<path> or tcp://127.0.0.1:<port>, got {address!r}")


@dataclass(slots=True)
class ServerConfig:
    """Front-end settings (the engine has its own :class:`EngineConfig`)."""

    address: str = field(default_factory=default_address)
    worker_timeout_s: float = 30.0
    threads: int = 4
    shm_dir: str = SHM_DIR
    allow_remote: bool = False

    def __post_init__(self) -> None:
        check_address(self.address, allow_remote=self.allow_remote)
        if not isinstance(self.worker_timeout_s, (int, float)) or self.worker_timeout_s <= 0:
            raise ValueError(f"worker_timeout_s must be positive, got {self.worker_timeout_s!r}")
        if not isinstance(self.threads, int) or not 1 <= self.threads <= 256:
            raise ValueError(f"threads must be an int in [1, 256], got {self.threads!r}")


class CacheServer:
    """Serves a :class:`gpukv.CacheEngine` over ZMQ until :meth:`stop` is called."""

    def __init__(self, engine, config: ServerConfig | None = None) -> None:
        self.engine = engine
        self.config = config or ServerConfig()
        self.handlers = Sessions(engine, worker_timeout_s=self.config.worker_timeout_s,
                                 shm_dir=self.config.shm_dir)
        self._ctx = zmq.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self._bind()
        self._replies: queue.SimpleQueue[tuple[bytes, Reply]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._stopping = threading.Event()
        self._transfer = ThreadPoolExecutor(self.config.threads, thread_name_prefix="gpukv-xfer")
        self._control = ThreadPoolExecutor(2, thread_name_prefix="gpukv-ctl")
        self.address = self._router.getsockopt(zmq.LAST_ENDPOINT).decode()
        # an L1-only lookup takes microseconds: answer it in the loop; one that may read the
        # disk or remote tier goes to the control pool
        self._inline = _INLINE if getattr(engine, "tiers", None) else _INLINE + (Lookup,)

    def _bind(self) -> None:
        address = self.config.address
        if address.startswith("ipc://"):
            path = Path(address[len("ipc://"):])
            if path.exists():
                if _ipc_alive(path):
                    raise ValueError(f"another server is listening on {address}")
                path.unlink()
            old = os.umask(0o077)  # only this user may connect
            try:
                self._router.bind(address)
            finally:
                os.umask(old)
        else:
            self._router.bind(address)

    # ---- the ROUTER loop -------------------------------------------------------------------
    def serve_forever(self) -> None:
        """Run the loop in this thread until :meth:`stop`; then release everything."""
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        reap_every = min(1.0, self.config.worker_timeout_s / 4)
        next_reap = time.monotonic() + reap_every
        log.info("gpukv server listening on %s (chunk_size=%d, worker timeout %.1f s)",
                 self.address, self.engine.config.chunk_size, self.config.worker_timeout_s)
        try:
            while not self._stopping.is_set():
                timeout_ms = max(0.0, next_reap - time.monotonic()) * 1000
                events = dict(poller.poll(timeout_ms))
                if self._wake_r in events:
                    os.read(self._wake_r, 65536)
                self._send_replies()
                if self._router in events:
                    for _ in range(64):
                        try:
                            frames = self._router.recv_multipart(zmq.NOBLOCK, copy=True)
                        except zmq.Again:
                            break
                        self._on_frames(frames)
                if time.monotonic() >= next_reap:
                    next_reap = time.monotonic() + reap_every
                    self.handlers.reap_idle()
        finally:
            self._shutdown()

    def _on_frames(self, frames: list[bytes]) -> None:
        identity = frames[0]
        if len(frames) != 2:
            self._router.send_multipart([identity, encode_reply(error_reply(
                0, ProtocolError(f"a request is one frame, got {len(frames) - 1}")))])
            return
        try:
            request = decode_request(frames[1])
        except ProtocolError as exc:
            log.debug("bad request: %s", exc)
            self._router.send_multipart([identity, encode_reply(error_reply(exc.seq, exc))])
            return
        self.handlers.touch(request.session)
        if isinstance(request.body, self._inline):
            self._router.send_multipart([identity, encode_reply(self._run(request))])
            return
        pool = self._control if isinstance(request.body, _CONTROL) else self._transfer
        pool.submit(self._run_and_queue, identity, request)

    def _run(self, request: Request) -> Reply:
        try:
            return ok_reply(request.seq, self.handlers.handle(request.session, request.body))
        except Exception as exc:  # noqa: BLE001 - the loop must answer every request and live on
            if isinstance(exc, (ValueError, TypeError, KeyError)):
                log.debug("request %s failed: %s", type(request.body).__name__, exc)
            else:
                log.warning("request %s failed", type(request.body).__name__, exc_info=True)
            return error_reply(request.seq, exc)

    def _run_and_queue(self, identity: bytes, request: Request) -> None:
        self._replies.put((identity, self._run(request)))
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # the pipe is full: a wake-up is pending anyway

    def _send_replies(self) -> None:
        while True:
            try:
                identity, reply = self._replies.get_nowait()
            except queue.Empty:
                return
            self._router.send_multipart([identity, encode_reply(reply)])

    # ---- lifecycle -------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the loop to exit (thread- and signal-safe)."""
        self._stopping.set()
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    def _shutdown(self) -> None:
        self._control.shutdown(wait=True, cancel_futures=True)
        self._transfer.shutdown(wait=True, cancel_futures=True)
        self._send_replies()
        self.handlers.close()
        self._router.close(linger=0)
        self._ctx.term()
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self.address.startswith("ipc://"):
            Path(self.address[len("ipc://"):]).unlink(missing_ok=True)
        log.info("gpukv server on %s stopped", self.address)


def _ipc_alive(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def serve_main(args: argparse.Namespace) -> int:
    """Entry point of ``gpukv serve`` (options from :func:`gpukv.cli.build_parser`)."""
    from gpukv.config import EngineConfig
    from gpukv.engine import CacheEngine

    config = ServerConfig(address=args.address or default_address(),
                          worker_timeout_s=args.worker_timeout, threads=args.threads,
                          allow_remote=getattr(args, "allow_remote", False))
    engine = CacheEngine(EngineConfig(capacity_bytes=args.capacity, device=args.device,
                                      chunk_size=args.chunk_size, disk_dir=args.disk_dir,
                                      disk_capacity_bytes=args.disk_capacity,
                                      remote_url=args.remote_url))
    remove_stale(config.shm_dir)  # files of workers that died while no server was up
    server = CacheServer(engine, config)
    sys.setswitchinterval(0.001)  # the loop thread waits less for the GIL behind a transfer
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: server.stop())
    try:
        server.serve_forever()
    finally:
        engine.close()
    return 0


class ServerProcess:
    """A ``gpukv serve`` child process (``python -m gpukv.cli serve``) for demos, tests, sweeps.

    ``wait_ready()`` pings until it answers; ``stop()`` sends SIGTERM (SIGKILL after
    ``timeout_s``); also a context manager.
    """

    def __init__(self, address: str, *, capacity_bytes: int = 256 << 20, device: str = "cpu",
                 chunk_size: int = 256, disk_dir: str | os.PathLike | None = None,
                 worker_timeout_s: float = 30.0, threads: int = 4, log_level: str = "WARNING",
                 ready_timeout_s: float = 120.0) -> None:
        check_address(address)
        self.address = address
        self.argv = [sys.executable, "-m", "gpukv.cli", "--log-level", log_level, "serve",
                     "--address", address, "--capacity", str(capacity_bytes), "--device", device,
                     "--chunk-size", str(chunk_size), "--worker-timeout", str(worker_timeout_s),
                     "--threads", str(threads)]
        if disk_dir is not None:
            self.argv += ["--disk-dir", str(disk_dir)]
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
