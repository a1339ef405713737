"""``run_group``: how the vLLM tests, the demo and the sweep run an engine process. Everything
left in the engine's session dies with it, at exit or timeout (vLLM's engine core outlives its
parent and holds its pipes), and a server started in a session of its own lives on."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from gpukv.testing.engine_session import output_tail, run_group

# A parent that starts a grandchild in its own session (like vLLM's engine core) and one in a
# new session (like autostart's server), writes their pids, prints, and then exits or hangs.
PARENT = r"""
import subprocess, sys, time
stay = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
away = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
open(sys.argv[1], "w").write(f"{stay.pid} {away.pid}")
print("parent says hi", flush=True)
print("parent complains", file=sys.stderr, flush=True)
if sys.argv[2] == "hang":
    time.sleep(600)
sys.exit(int(sys.argv[2]))
"""


def _gone(pid: int, timeout_s: float = 10.0) -> bool:
    """True once ``pid`` no longer runs (absent, or a zombie waiting for its reaper)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.02)
    return False


def _run(tmp_path: Path, mode: str, timeout_s: float) -> tuple[int | TimeoutError, int, int]:
    """(exit code or the TimeoutError, pid left in the session, pid in a session of its own)."""
    pids = tmp_path / "pids"
    cmd = [sys.executable, "-c", PARENT, str(pids), mode]
    try:
        result = run_group(cmd, env=dict(os.environ), timeout_s=timeout_s, log_dir=tmp_path / "log")
    except TimeoutError as exc:
        result = exc
    stay, away = map(int, pids.read_text().split())
    return result, stay, away


def test_exit_codes_come_back_and_what_the_process_left_in_its_session_is_killed(tmp_path):
    for code in (0, 3):
        rc, stay, away = _run(tmp_path / str(code), str(code), timeout_s=60)
        try:
            assert rc == code
            assert _gone(stay), "a process left in the session outlived run_group"
            assert not _gone(away, timeout_s=0.2), "a process in a session of its own was killed"
            assert "parent says hi" in output_tail(tmp_path / str(code) / "log")
        finally:
            os.kill(away, signal.SIGKILL)


def test_a_hung_process_is_killed_at_the_timeout_with_its_output(tmp_path):
    t = time.monotonic()
    err, stay, away = _run(tmp_path, "hang", timeout_s=5)
    os.kill(away, signal.SIGKILL)
    assert time.monotonic() - t < 60  # not the hang's 600 s: nothing waits on inherited pipes
    assert isinstance(err, TimeoutError)
    assert "killed after 5 s" in str(err)
    assert "parent says hi" in str(err) and "parent complains" in str(err)
    assert _gone(stay)
