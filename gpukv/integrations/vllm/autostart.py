"""One ``gpukv serve`` per address, started by whichever engine process finds none.

vLLM starts the worker connectors before the scheduler's, and the TP workers of an engine start
together; several engines may start at once too. Each of them calls :func:`ensure_server`: the
first one to find no server at the address starts it, under an exclusive ``flock`` on a lock file
beside the socket (``<socket>.lock``; for tcp:// addresses in this user's runtime folder), and
holds the lock until the server answers; the others wait for the lock, then find the server
answering. ``flock`` is released by the kernel when its holder dies, so a crashed starter never
leaves a stale lock. The lock and the log are opened only in trusted folders, never through a
link, and must be this user's regular files (:mod:`gpukv.private_paths`): another user who
planted a link there gets nothing chmod-ed or appended to.

The server must outlive the engine that started it (the next engine finds it again by its
address): it runs in a session of its own (a Ctrl-C or a process-group kill of the engine does
not reach it), detached from the process that started it (its parent is init: vLLM kills a stuck
engine with all its descendants), with its output in ``<lock>.log``, on every CPU (a vLLM-CPU
worker is bound to its cores; the server must not inherit that). It runs until it is stopped
(SIGTERM); ``gpukv serve`` has no idle exit yet.
"""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from gpukv.frontend.client import CacheClient, ServerUnavailable
from gpukv.frontend.peer import check_address, ipc_path
from gpukv.private_paths import open_private, runtime_dir, trusted_folder

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0


def lock_path(address: str) -> Path:
    """The lock file of ``address``, in a trusted folder (the runtime folder is created 0700
    when it is the one); ValueError naming the folder otherwise."""
    check_address(address)
    if address.startswith("ipc://") and not ipc_path(address).startswith("@"):
        path = Path(ipc_path(address) + ".lock")
        if path.parent == runtime_dir():
            runtime_dir(create=True)
    else:
        name = address.replace("://", "-").replace("/", "_").replace(":", "-").replace("@", "")
        path = runtime_dir(create=True) / f"{name}.lock"
    if not path.parent.is_dir():
        raise ValueError(f"cannot autostart a server at {address}: folder {str(path.parent)!r} "
                         "does not exist")
    try:
        return trusted_folder(path.parent) / path.name
    except ValueError as exc:
        raise ValueError(f"cannot autostart a server at {address}: {exc}") from None


def answers(address: str, timeout_s: float = 1.0) -> dict | None:
    """The server's PING reply (it has ``pid``, ``chunk_size``...), or None if nobody answers."""
    try:
        with CacheClient(address, connect_timeout_s=timeout_s, ping_interval_s=0) as client:
            return client.server_info
    except ServerUnavailable:
        return None


def ensure_server(address: str, *, serve_args: Sequence[str] = (),
                  ready_timeout_s: float = READY_TIMEOUT_S) -> tuple[dict, bool]:
    """Make sure a ``gpukv serve`` answers at ``address``; returns ``(ping reply, started)``,
    ``started`` True when this call started it. ``serve_args`` go to ``gpukv serve`` (after
    ``--address``). Raises ``RuntimeError`` if the started server exits or stays silent."""
    info = answers(address)
    if info is not None:
        return info, False
    lock = lock_path(address)
    with os.fdopen(open_private(lock, os.O_RDWR | os.O_CREAT), "r+b") as held:
        _lock(held, ready_timeout_s, address)
        info = answers(address)  # another process may have started it while we waited
        if info is not None:
            return info, False
        return _start(address, list(serve_args), lock, ready_timeout_s), True


def _lock(held, timeout_s: float, address: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"another process holds the autostart lock of {address} for "
                                   f"more than {timeout_s} s") from None
            time.sleep(0.05)


def _start(address: str, serve_args: list[str], lock: Path, timeout_s: float) -> dict:
    argv = [sys.executable, "-m", "gpukv.cli", "serve", "--address", address, *serve_args]
    log_path = lock.with_suffix(".log")
    with os.fdopen(open_private(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "ab") as out:
        pid = spawn_detached(argv, out, _server_env())
    try:
        os.sched_setaffinity(pid, range(os.cpu_count() or 1))
    except OSError as exc:  # some CPUs may be outside this cgroup: keep what it inherited
        log.debug("could not widen the autostarted server's CPU affinity: %s", exc)
    log.warning("gpukv: started `gpukv serve` at %s (pid %d, log %s); it keeps running after "
                "this engine exits", address, pid, log_path)
    deadline = time.monotonic() + timeout_s
    while True:
        if not _alive(pid):
            raise RuntimeError(f"the autostarted gpukv serve (pid {pid}) exited; see {log_path}")
        info = answers(address, timeout_s=0.5)
        if info is not None:
            return info
        if time.monotonic() > deadline:
            raise RuntimeError(f"the autostarted gpukv serve (pid {pid}) did not answer at "
                               f"{address} in {timeout_s} s; see {log_path}")
        time.sleep(0.05)


# A launcher process starts the server in a session of its own and exits at once: the server is
# then re-parented to init (or the nearest subreaper), no descendant of the engine. vLLM kills
# its whole process tree at shutdown (vllm.utils.system_utils.kill_process_tree, by parentage,
# whatever the session): a server the engine forked directly died with it.
_LAUNCHER = ("import subprocess, sys\n"
             "p = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL, stdout=2, stderr=2,"
             " start_new_session=True)\n"
             "print(p.pid, flush=True)\n")


def spawn_detached(argv: list[str], out, env: dict[str, str]) -> int:
    """Start ``argv`` (its output to the file ``out``) as no descendant of this process; its pid."""
    launcher = subprocess.run([sys.executable, "-c", _LAUNCHER, *argv], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=out, env=env, timeout=60, check=True)
    return int(launcher.stdout)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (not a zombie: a re-parented server is reaped by its new parent)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _server_env() -> dict[str, str]:
    """The engine's environment minus what binds a vLLM worker to its cores. The GPU selection
    (``CUDA_VISIBLE_DEVICES``) stays: the server must see the GPUs the engine's workers see (an
    engine pinned to GPUs 4-7 must not get its arenas, and a CUDA context, on GPU 0)."""
    drop = ("VLLM_CPU_OMP_THREADS_BIND", "OMP_NUM_THREADS", "KMP_AFFINITY", "GOMP_CPU_AFFINITY")
    return {k: v for k, v in os.environ.items() if k not in drop}
