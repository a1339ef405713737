"""An engine process in a session of its own (vLLM's engine-core and worker processes do not die
with their parent): run one to its end or its timeout with its output in log files, kill what it
left, read the tails of its logs, and the environment an engine runs with. Used by the vLLM
tests, the demo and the perf sweeps."""

from __future__ import annotations

import os
from typing import Sequence


def run_group(cmd: Sequence[str], *, env: dict[str, str], timeout_s: float,
              log_dir: str | os.PathLike) -> int:
    """Run ``cmd`` in a session of its own, its output in ``log_dir/stdout.log`` and
    ``stderr.log``; returns its exit code. When it exits, or at ``timeout_s`` (then
    ``TimeoutError`` with the output tails), or when the caller is interrupted, every process left
    in that session is killed: vLLM's engine-core and worker processes do not die with their
    parent, and a pipe they inherited would block a reader for ever. (A server started with a
    session of its own, as ``autostart`` does, is not in it and lives on.)"""
    import subprocess
    from pathlib import Path

    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "stdout.log", "wb") as out, open(log_dir / "stderr.log", "wb") as err:
        proc = subprocess.Popen(list(cmd), env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                start_new_session=True)
    try:
        rc = proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        kill_session(proc)
    if rc is None:
        raise TimeoutError(f"killed after {timeout_s} s: {' '.join(cmd)}\n{output_tail(log_dir)}")
    return rc


def kill_session(proc) -> None:
    """SIGKILL every process left in the session ``proc`` leads (it was started with
    ``start_new_session=True``), then reap ``proc``."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # the whole session has exited
        pass
    proc.wait()


def output_tail(log_dir: str | os.PathLike) -> str:
    """The last lines of a :func:`run_group` run's stdout and stderr."""
    from pathlib import Path

    parts = []
    for name, keep in (("stdout.log", 3000), ("stderr.log", 6000)):
        path = Path(log_dir) / name
        text = path.read_text(errors="replace") if path.exists() else ""
        parts.append(text[-keep:])
    return "\n".join(parts)


def engine_env() -> dict[str, str]:
    """This process's environment without what must not reach vLLM: the Triton interpreter
    switch (vLLM-CPU does not use Triton); vLLM logs at WARNING and sends no usage statistics
    unless told otherwise."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")  # a local test or demo run reports nowhere
    return env
