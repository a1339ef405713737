"""Which processes a session came from, as the server observes them, and whether they run."""

from __future__ import annotations

import os
import subprocess
import sys

import zmq

from gpukv.frontend.liveness import MAX_PROCESSES, Peers, Process, peer_pid, process, running


def test_peer_pid_comes_from_the_kernel_on_ipc_and_is_absent_on_tcp(tmp_path):
    ctx = zmq.Context()
    try:
        for address in (f"ipc://{tmp_path}/s.sock", "tcp://127.0.0.1:*"):
            router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
            router.bind(address)
            dealer.connect(router.getsockopt(zmq.LAST_ENDPOINT).decode())
            dealer.send(b"x")
            _, frame = router.recv_multipart(copy=False)
            want = os.getpid() if address.startswith("ipc") else None
            assert peer_pid(frame.get("Peer-Address")) == want
            router.close(0)
            dealer.close(0)
    finally:
        ctx.term()
    assert peer_pid("localhost:0:0:123") == 123 and peer_pid("") is None
    assert peer_pid("127.0.0.1") is None and peer_pid(None) is None


def test_a_process_is_known_by_pid_and_start_time():
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    proc = process(child.pid)
    assert proc is not None and running(proc)
    assert not running(Process(child.pid, proc.start + 1))  # the pid reused by a later process
    child.stdin.close()
    child.wait()
    assert not running(proc) and process(child.pid) is None and process(0) is None


def test_peers_verified_unverified_and_gone():
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    peers = Peers()
    peers.observe(child.pid)
    peers.observe(child.pid)
    assert peers.main.pid == child.pid and not peers.unverified and not peers.gone()
    child.stdin.close()
    child.wait()
    assert peers.gone()
    for pid in (None, 0):  # tcp://, or a peer in a pid namespace the server does not see
        other = Peers()
        other.observe(os.getpid())
        other.observe(pid)
        assert other.unverified and other.main is None and not other.gone()
    crowd = Peers()
    for _ in range(MAX_PROCESSES):
        crowd.processes[len(crowd.processes) + 10**7] = Process(os.getpid(), 0)
    crowd.observe(os.getpid())
    assert crowd.unverified  # a session shared by more processes than the server keeps
