"""Objects that own ZMQ sockets and are dropped unclosed inside a garbage cycle (what a failed
test's traceback or a raising constructor leaves) are collected without hanging the process.

pyzmq destroys such a context from its ``__del__`` after the cycle's weak references are gone,
so it cannot close the sockets and blocks in ``term()`` for ever: a failed events test once hung
a whole CI run 15 tests later, in an unrelated fixture. Each case runs in a fresh process (a hang
must not take pytest with it) that builds the object, drops it in a cycle, collects, and prints.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import zmq

from frontend_cases import serving
from gpukv.zmq_context import OwnedContext

COLLECT = """
import gc, sys
gc.disable()  # only the collect below may find the cycle
address = sys.argv[1]
{build}
cycle = [obj]
cycle.append(cycle)
del obj, cycle
gc.collect()
print("collected", flush=True)
"""

BUILDS = {
    "event subscriber": "from gpukv.ops.replay import EventSubscriber\n"
                        "obj = EventSubscriber(address)",
    "client": "from gpukv.frontend.client import CacheClient\n"
              "obj = CacheClient(address, ping_interval_s=0)\n"
              "obj.stats()  # a pooled, connected socket",
    "server never served": "from gpukv.config import EngineConfig\n"
                           "from gpukv.engine.core import CacheCore\n"
                           "from gpukv.frontend.server import CacheServer, ServerConfig\n"
                           "core = CacheCore(EngineConfig(capacity_bytes=1 << 20, chunk_size=16), shared=True)\n"
                           "obj = CacheServer(core, ServerConfig(address=address + '.own'))",
}


@pytest.mark.parametrize("name", sorted(BUILDS))
def test_an_unclosed_owner_in_a_garbage_cycle_is_collected_without_a_hang(tmp_path, name):
    with serving(tmp_path) as server:
        code = COLLECT.format(build=BUILDS[name])
        try:
            out = subprocess.run([sys.executable, "-c", code, server.address], capture_output=True,
                                 text=True, timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"collecting an unclosed {name} hung")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "collected"


def test_close_closes_the_sockets_then_the_context_once():
    class Owner:
        pass

    owner = Owner()
    owned = OwnedContext(owner)
    a, b = owned.socket(zmq.DEALER), owned.socket(zmq.PUB)
    owned.close_socket(b, linger=0)
    assert b.closed and not a.closed and not owned.closed
    owned.close()
    assert a.closed and owned.ctx.closed and owned.closed
    owned.close()  # idempotent
    with pytest.raises(zmq.ZMQError):
        owned.socket(zmq.DEALER)


def test_collecting_the_owner_closes_what_it_left_open():
    class Owner:
        pass

    owner = Owner()
    owner.owned = OwnedContext(owner)
    sock = owner.owned.socket(zmq.DEALER)
    ctx = owner.owned.ctx
    owner.cycle = owner  # only the cycle collector can free it
    del owner
    import gc

    gc.collect()
    assert sock.closed and ctx.closed


def test_closing_a_channel_during_a_call_in_flight_fails_that_call_and_returns(tmp_path):
    """close() terminates the context without touching a socket another thread is blocked on:
    that call fails with ETERM and closes its own socket, and close() then returns."""
    import os
    import threading

    from gpukv.frontend import protocol as p
    from gpukv.frontend.channel import Channel

    ctx = zmq.Context()
    silent = ctx.socket(zmq.ROUTER)  # receives, never answers
    silent.setsockopt(zmq.LINGER, 0)
    address = f"ipc://{tmp_path}/silent.sock"
    silent.bind(address)
    channel = Channel(address, os.urandom(16).hex(), None, timeout_s=60)
    raised: list = []

    def call() -> None:
        try:
            channel.call(p.Ping(os.getpid()))
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            raised.append(exc)

    thread = threading.Thread(target=call)
    try:
        thread.start()
        assert silent.poll(10_000)  # the request arrived: the call now waits in recv
        channel.close()
        thread.join(10)
        assert not thread.is_alive()
        assert len(raised) == 1 and isinstance(raised[0], zmq.ContextTerminated), raised
        assert channel._zmq.closed and channel._zmq.ctx.closed  # noqa: SLF001
    finally:
        silent.close()
        ctx.term()
