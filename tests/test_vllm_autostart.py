"""Autostart of ``gpukv serve`` by the connector (:mod:`gpukv.integrations.vllm.autostart`),
without vLLM: three processes that find no server at once start exactly one, it outlives them,
and the next caller finds it by its address."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpukv.integrations.vllm.autostart import _server_env, answers, ensure_server, lock_path
from gpukv.frontend.protocol import default_address
from gpukv.private_paths import runtime_dir
from other_user import OTHER_UID, as_other_user, as_root, point_at, shared_folder

STARTER = """
import json, sys
from gpukv.integrations.vllm.autostart import ensure_server
info, started = ensure_server(sys.argv[1], serve_args=["--capacity", "8MiB", "--chunk-size", "64"])
print(json.dumps({"pid": info["pid"], "started": started, "chunk_size": info["chunk_size"]}))
"""


def _stop(pid: int) -> None:
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


def test_racing_starters_start_one_server_that_outlives_them(tmp_path: Path):
    address = f"ipc://{tmp_path}/gpukv.sock"
    assert answers(address) is None
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = [subprocess.Popen([sys.executable, "-c", STARTER, address], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(3)]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    pids = {o["pid"] for o in outs}
    try:
        assert len(pids) == 1 and sorted(o["started"] for o in outs) == [False, False, True]
        assert {o["chunk_size"] for o in outs} == {64}
        (pid,) = pids
        assert all(p.pid != pid for p in procs)
        # every starter has exited; the server still answers, and the next caller finds it
        info, started = ensure_server(address)
        assert (info["pid"], started) == (pid, False)
        lock = lock_path(address)
        assert lock == tmp_path / "gpukv.sock.lock" and lock.with_suffix(".log").is_file()
        assert oct(lock.stat().st_mode & 0o777) == "0o600"
    finally:
        for pid in pids:
            _stop(pid)
    assert answers(address) is None


def test_a_server_that_cannot_start_is_reported_with_its_log(tmp_path: Path):
    address = f"ipc://{tmp_path}/gpukv.sock"
    with pytest.raises(RuntimeError, match=r"exited; see .*gpukv.sock.log"):
        ensure_server(address, serve_args=["--no-such-flag"], ready_timeout_s=60)
    assert "--no-such-flag" in (tmp_path / "gpukv.sock.log").read_text()


def test_lock_paths_live_beside_the_socket_or_in_the_users_folder(tmp_path: Path):
    assert lock_path(f"ipc://{tmp_path}/s.sock") == tmp_path / "s.sock.lock"
    tcp = lock_path("tcp://127.0.0.1:5555")
    assert tcp.parent == runtime_dir() and tcp.name == "tcp-127.0.0.1-5555.lock"
    with pytest.raises(ValueError, match="does not exist"):
        lock_path(f"ipc://{tmp_path}/missing/s.sock")
    with pytest.raises(ValueError, match="not a loopback address"):
        lock_path("tcp://10.0.0.1:5555")


def test_the_server_sees_the_engines_gpus_but_not_its_core_binding(monkeypatch):
    """An engine pinned to GPUs 4-7 autostarts a server that sees GPUs 4-7 (cuda:0 there is
    physical GPU 4), never all of them; the worker's OpenMP core binding is left behind."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0-3")
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    env = _server_env()
    assert env["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in env and "OMP_NUM_THREADS" not in env


HOLDER = """
import json, sys
from gpukv.integrations.vllm.autostart import ensure_server
info, started = ensure_server(sys.argv[1], serve_args=["--capacity", "8MiB", "--chunk-size", "64"])
print(json.dumps({"pid": info["pid"], "started": started}), flush=True)
sys.stdin.read()  # stays alive until the test kills it
"""


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (what vLLM's kill_process_tree kills), from /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_bytes()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(b")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def test_the_server_is_no_descendant_of_the_process_that_started_it(tmp_path: Path):
    """vLLM force-kills an engine that does not stop in time with every process below it; the
    server a worker started must survive that."""
    address = f"ipc://{tmp_path}/gpukv.sock"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, address], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    out = None
    try:
        out = json.loads(holder.stdout.readline())
        assert out["started"] and out["pid"] not in _descendants(holder.pid)
        for pid in _descendants(holder.pid) | {holder.pid}:  # kill_process_tree
            os.kill(pid, signal.SIGKILL)
        holder.wait(30)
        assert answers(address, timeout_s=5)["pid"] == out["pid"]
    finally:
        if holder.poll() is None:
            holder.kill()
        if out is not None:
            _stop(out["pid"])


@as_root
def test_autostart_never_follows_another_users_links(tmp_path: Path, monkeypatch):
    """Issue 24 row 2: another user creates ``<tmp>/gpukv-<uid>`` (0777) and plants the lock and
    the log as links to this user's files. Before, autostart chmod-ed them 0600 and appended its
    log to them (as root: any file). Now the default address moves to the fallback folder and
    the planted links are never opened."""
    shared, home = shared_folder("gpukv-test-tmp-"), tmp_path / "home"
    home.mkdir(mode=0o700)
    precious, journal = tmp_path / "precious", tmp_path / "journal"
    precious.write_bytes(b"keep\n")
    journal.write_bytes(b"mine\n")
    for f in (precious, journal):
        f.chmod(0o644)
    squat = shared / f"gpukv-{os.getuid()}"
    as_other_user("mkdir", "-m", "0777", squat)
    as_other_user("ln", "-s", precious, squat / "gpukv.sock.lock")
    as_other_user("ln", "-s", journal, squat / "gpukv.sock.log")
    point_at(monkeypatch, shared, home)
    pid = None
    try:
        info, started = ensure_server(default_address(), serve_args=[
            "--capacity", "8MiB", "--chunk-size", "64"])
        pid = info["pid"]
        assert started and default_address() == f"ipc://{home}/.cache/gpukv/run/gpukv.sock"
    finally:
        if pid is not None:
            _stop(pid)
        for f, content in ((precious, b"keep\n"), (journal, b"mine\n")):
            assert f.read_bytes() == content and oct(f.stat().st_mode & 0o777) == "0o644"
        assert sorted(p.name for p in squat.iterdir()) == ["gpukv.sock.lock", "gpukv.sock.log"]
        shutil.rmtree(shared)


@as_root
def test_a_planted_lock_link_in_a_shared_folder_is_refused(tmp_path: Path):
    shared = shared_folder("gpukv-test-tmp-")
    precious = tmp_path / "precious"
    precious.write_bytes(b"keep\n")
    try:
        as_other_user("ln", "-s", precious, shared / "gpukv.sock.lock")
        with pytest.raises(ValueError, match="a link is in its place"):
            ensure_server(f"ipc://{shared}/gpukv.sock")
        as_other_user("mkdir", "-m", "0777", shared / "open")
        with pytest.raises(ValueError, match=f"owned by uid {OTHER_UID}"):
            ensure_server(f"ipc://{shared}/open/gpukv.sock")
        assert precious.read_bytes() == b"keep\n" and os.listdir(shared / "open") == []
    finally:
        shutil.rmtree(shared)
