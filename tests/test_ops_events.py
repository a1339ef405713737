"""KV events: a scripted life of the cache (stores, spills, evictions, expiry, corruption, a clear
and a restart) replays to exactly what each tier holds; gaps are detected; PUB/SUB over ipc://
delivers every event in order with consecutive numbers; the publisher never blocks its callers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time

import msgspec
import pytest

from gpukv.ops.events import (REMOVED_REASONS, STORED_REASONS, EventPublisher, KvRemoved, KvStored,
                              decode_event, encode_event)
from gpukv.ops.replay import EventSubscriber, TierState, replay
from other_user import OTHER_UID, as_other_user, as_root, other_user_argv, shared_folder


def h(i: int) -> bytes:
    return i.to_bytes(16, "big")


def keys(model: str, kv_rank: int, *ids: int) -> set:
    return {(model, kv_rank, h(i)) for i in ids}


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


def first_life(pub: EventPublisher) -> None:
    """A server's life: 4 chunks of an MLA model and 2 of an MHA model's rank 1."""
    pub.stored("L1", "dsv3", 0, [h(0), h(1), h(2), h(3)])            # STORE commits
    pub.stored("L1", "llama", 1, [h(0), h(1)])                        # MHA rank 1, same hashes
    pub.stored("disk", "dsv3", 0, [h(0), h(1), h(2), h(3)])           # the spill reaches disk
    pub.stored("remote", "dsv3", 0, [h(0), h(1)])                     # ... and Redis
    pub.removed("L1", "dsv3", 0, [h(0), h(1)], "evicted")             # L1 pressure
    pub.stored("L1", "dsv3", 0, [h(0)], "loaded")                     # a lookup loads it back
    pub.removed("L1", "dsv3", 0, [h(0)], "released")                  # temporary copy freed
    pub.removed("remote", "dsv3", 0, [h(1)], "expired")               # the remote TTL ran out
    pub.removed("disk", "dsv3", 0, [h(3)], "corrupt")                 # a load found it corrupt
    pub.removed("L1", "dsv3", 0, [h(2), h(3)], "cleared")             # POST /clear
    pub.stored("L1", "llama", 1, [])                                  # nothing new: no event


def test_a_scripted_life_with_a_restart_replays_to_exactly_the_tiers_contents():
    first = EventPublisher(buffer_size=100, clock=FakeClock())
    first_life(first)
    events = first.take_events()
    assert [e.seq for e in events] == list(range(10))
    state = replay(events)
    assert state.complete and state.unknown_removals == 0
    assert state.tiers == {"L1": keys("llama", 1, 0, 1),
                           "disk": keys("dsv3", 0, 0, 1, 2),
                           "remote": keys("dsv3", 0, 0)}
    first.close()
    # the server restarts: a new epoch; the disk tier announces what it found at start-up
    second = EventPublisher(buffer_size=100, clock=FakeClock())
    assert second.epoch != first.epoch
    second.stored("disk", "dsv3", 0, [h(0), h(1), h(2)], "restart")
    second.stored("L1", "dsv3", 0, [h(5)])
    second.removed("disk", "dsv3", 0, [h(2)], "deleted")
    later = second.take_events()
    assert [e.seq for e in later] == [0, 1, 2]
    state.apply_all(later)
    assert state.complete and state.epoch == second.epoch
    assert state.tiers == {"L1": keys("dsv3", 0, 5),           # the old process's L1 is gone
                           "disk": keys("dsv3", 0, 0, 1),
                           "remote": keys("dsv3", 0, 0)}       # Redis outlived the server
    assert replay(events + later).tiers == state.tiers       # pure: same input, same result


def test_a_missing_event_a_late_join_and_a_new_epoch_mid_stream_are_gaps():
    pub = EventPublisher(buffer_size=100)
    first_life(pub)
    events = pub.take_events()
    lost = replay(events[:4] + events[5:])       # the eviction never arrived
    assert not lost.complete and lost.gaps == [(pub.epoch, 4, 5)]
    assert keys("dsv3", 0, 1) <= lost.tiers["L1"]   # a stale object it cannot know is gone
    late = replay(events[3:])
    # it never saw L1 h0-h3 nor disk h3 stored: the evictions of h0, h1, the clear of h2, h3
    # and the corrupt disk h3 remove objects it did not know
    assert late.gaps == [(pub.epoch, 0, 3)] and late.unknown_removals == 5
    other = EventPublisher(buffer_size=10)
    other.stored("L1", "m", 0, [h(1)])
    other.stored("L1", "m", 0, [h(2)])
    restarted = replay(events + other.take_events()[1:])
    assert restarted.gaps == [(other.epoch, 0, 1)]
    again = replay(events + events[-1:])          # a repeat is a break in the numbering too
    assert again.gaps == [(pub.epoch, 10, 9)]


def test_a_full_in_process_buffer_drops_and_counts_and_the_reader_sees_the_gap():
    pub = EventPublisher(buffer_size=3)
    for i in range(5):
        pub.stored("L1", "m", 0, [h(i)])
    assert pub.dropped_buffer == 2 and pub.next_seq == 5
    got = pub.take_events()
    assert [e.seq for e in got] == [0, 1, 2] and pub.take_events() == []
    pub.stored("L1", "m", 0, [h(9)])
    state = replay(got + pub.take_events())
    assert state.gaps == [(pub.epoch, 3, 5)]


@pytest.mark.parametrize("call, exc", [
    (lambda p: p.stored("L2", "m", 0, [h(0)]), ValueError),
    (lambda p: p.stored("L1", "", 0, [h(0)]), ValueError),
    (lambda p: p.stored("L1", "m", -1, [h(0)]), ValueError),
    (lambda p: p.stored("L1", "m", True, [h(0)]), ValueError),
    (lambda p: p.stored("L1", "m", 0, [b"short"]), ValueError),
    (lambda p: p.stored("L1", "m", 0, [h(0).hex()]), ValueError),
    (lambda p: p.stored("L1", "m", 0, h(0)), TypeError),
    (lambda p: p.stored("L1", "m", 0, [h(0)], "evicted"), ValueError),
    (lambda p: p.removed("L1", "m", 0, [h(0)], "new"), ValueError),
    (lambda p: p.removed("L1", "m", 0, [h(0)], "gone"), ValueError),
])
def test_bad_events_raise_and_take_no_number(call, exc):
    pub = EventPublisher(buffer_size=10)
    with pytest.raises(exc):
        call(pub)
    assert pub.next_seq == 0 and pub.take_events() == []


def test_the_wire_format_is_tagged_msgpack_and_garbage_is_refused():
    event = KvRemoved(7, 123, 1.5, "disk", "m", 2, [h(1), h(2)], "tier_error")
    payload = encode_event(event)
    assert decode_event(payload) == event
    plain = msgspec.msgpack.decode(payload)  # self-describing for any msgpack reader
    assert plain == {"type": "removed", "seq": 7, "epoch": 123, "ts": 1.5, "tier": "disk",
                     "model": "m", "kv_rank": 2, "chunk_hashes": [h(1), h(2)],
                     "reason": "tier_error"}
    assert isinstance(decode_event(encode_event(KvStored(0, 1, 0.0, "L1", "m", 0, [], "new"))),
                      KvStored)
    import pickle
    for junk in (b"", b"\xc1", pickle.dumps(event.__struct_fields__),
                 msgspec.msgpack.encode({**plain, "tier": "L9"}),
                 msgspec.msgpack.encode({**plain, "type": "stored"}),  # "tier_error" not a store
                 msgspec.msgpack.encode({**plain, "type": "moved"})):
        with pytest.raises(ValueError):
            decode_event(junk)
    assert set(STORED_REASONS) & set(REMOVED_REASONS) == set()


@pytest.fixture
def ipc_address(tmp_path) -> str:
    return f"ipc://{tmp_path}/events.sock"


def test_pub_sub_over_ipc_delivers_every_event_in_order_from_many_threads(ipc_address):
    threads, per_thread = 4, 250
    with EventPublisher(ipc_address) as pub, EventSubscriber(ipc_address) as sub:
        assert pub.wait_for_subscribers(1, timeout_s=10)
        start = threading.Barrier(threads)

        def work(t: int) -> None:
            start.wait()
            for i in range(per_thread):
                pub.stored("L1", f"model{t}", 0, [h(t * 1000 + i)])
                pub.removed("L1", f"model{t}", 0, [h(t * 1000 + i)], "evicted") if i % 2 else None

        pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        total = threads * (per_thread + per_thread // 2)
        assert pub.next_seq == total and pub.dropped_queue == 0
        got = []
        while len(got) < total:
            event = sub.recv(timeout_s=10)
            assert event is not None, f"only {len(got)} of {total} events arrived"
            got.append(event)
        assert [e.seq for e in got] == list(range(total))
        assert {e.epoch for e in got} == {pub.epoch}
        state = replay(got)
        assert state.complete
        assert state.tiers["L1"] == {(f"model{t}", 0, h(t * 1000 + i))
                                     for t in range(threads) for i in range(0, per_thread, 2)}
        assert sub.recv(timeout_s=0.05) is None


def test_a_late_subscriber_sees_a_gap(ipc_address):
    with EventPublisher(ipc_address) as pub:
        for i in range(3):
            pub.stored("L1", "m", 0, [h(i)])   # nobody listens: ZMQ drops these
        assert pub.flush(timeout_s=10) and pub.sent == 3
        with EventSubscriber(ipc_address) as sub:
            assert pub.wait_for_subscribers(1, timeout_s=10)
            pub.stored("L1", "m", 0, [h(3)])
            state = TierState()
            assert sub.recv_into(state, 5, timeout_s=1) == 1
            assert state.gaps == [(pub.epoch, 0, 3)] and not state.complete


class HeldSocket:
    """Wraps the publisher's socket; the first send waits until the test lets it go."""

    def __init__(self, sock) -> None:
        self.sock, self.entered, self.release = sock, threading.Event(), threading.Event()

    def send(self, *args):
        self.entered.set()
        assert self.release.wait(10)
        return self.sock.send(*args)

    def __getattr__(self, name):
        return getattr(self.sock, name)


def test_a_full_queue_drops_counts_and_never_blocks_the_caller(ipc_address):
    with EventPublisher(ipc_address, queue_size=4) as pub, EventSubscriber(ipc_address) as sub:
        assert pub.wait_for_subscribers(1, timeout_s=10)
        held = HeldSocket(pub._sock)
        pub._sock = held
        pub.stored("L1", "m", 0, [h(0)])
        assert held.entered.wait(10)                     # the socket thread is stuck in a send
        for i in range(1, 7):                            # 4 fit in the queue, 2 are dropped
            pub.stored("L1", "m", 0, [h(i)])
        assert pub.dropped_queue == 2 and pub.next_seq == 7
        held.release.set()
        assert pub.flush(timeout_s=10)
        state = TierState()
        assert sub.recv_into(state, 7, timeout_s=2) == 5
        assert state.gaps == [] and state.next_seq == 5   # seqs 5, 6 never left: a gap at the
        pub.stored("L1", "m", 0, [h(9)])                  # next event the subscriber gets
        assert sub.recv_into(state, 1, timeout_s=10) == 1
        assert state.gaps == [(pub.epoch, 5, 7)]


def test_an_ipc_path_in_use_is_refused_and_a_stale_one_reused(ipc_address, tmp_path):
    with EventPublisher(ipc_address):
        with pytest.raises(ValueError, match="listening"):
            EventPublisher(ipc_address)
    stale = tmp_path / "stale.sock"
    import socket
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # the file stays, nobody listens
    with EventPublisher(f"ipc://{stale}") as pub:
        assert pub.address == f"ipc://{stale}"
    assert not stale.exists()


def test_addresses_and_lifecycle():
    with pytest.raises(ValueError):
        EventPublisher("tcp://0.0.0.0:*")
    for kwargs in ({"queue_size": 0}, {"buffer_size": -1}, {"sndhwm": 0}):
        with pytest.raises(ValueError):
            EventPublisher(**kwargs)
    pub = EventPublisher("tcp://127.0.0.1:*")
    assert pub.address.startswith("tcp://127.0.0.1:")
    pub.close()
    pub.close()
    with pytest.raises(RuntimeError, match="closed"):
        pub.stored("L1", "m", 0, [h(0)])
    quiet = EventPublisher()  # no socket, no buffer: numbers only
    assert quiet.stored("L1", "m", 0, [h(0)]) == 0 and quiet.take_events() == []
    assert not quiet.wait_for_subscribers(1, timeout_s=0.01) and quiet.flush(0.01)
    with pytest.raises(ValueError):
        EventSubscriber("http://127.0.0.1:1")


NEIGHBOUR_SUBSCRIBER = """
import sys, zmq
sock = zmq.Context().socket(zmq.SUB)
sock.setsockopt(zmq.LINGER, 0)
sock.setsockopt(zmq.SUBSCRIBE, b"")
sock.connect(sys.argv[1])
print("ready", flush=True)
got = 0
while sock.poll(4000):
    sock.recv()
    got += 1
print(got, flush=True)
"""


@as_root
def test_tcp_events_reach_only_holders_of_the_key_file():
    """Issue 24 row 5: any local user subscribed to a tcp:// event socket and read model names
    and chunk hashes (before: every event). With CURVE, this user's subscriber (which reads the
    key file) gets them and another user's gets nothing."""
    with EventPublisher("tcp://127.0.0.1:*") as pub, EventSubscriber(pub.address) as mine:
        neighbour = subprocess.Popen(other_user_argv(sys.executable, "-c", NEIGHBOUR_SUBSCRIBER,
                                                     pub.address),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert neighbour.stdout.readline().strip() == "ready"
            assert pub.wait_for_subscribers(1, timeout_s=10)
            for i in range(50):  # while the neighbour listens (its handshake never completes)
                pub.stored("L1", "secret-model", 0, [h(i)])
                time.sleep(0.02)
            got = [mine.recv(timeout_s=10) for _ in range(50)]
            assert [e.model for e in got] == ["secret-model"] * 50
            out, err = neighbour.communicate(timeout=60)
            assert out.strip() == "0", (out, err[-2000:])
            assert pub.subscriptions == 1
        finally:
            neighbour.kill()
            neighbour.wait()


@as_root
def test_an_ipc_event_socket_only_in_a_folder_no_other_user_controls(tmp_path):
    shared = shared_folder("gpukv-test-events-")
    try:
        as_other_user("mkdir", "-m", "0777", shared / "theirs")
        with pytest.raises(ValueError, match=f"owned by uid {OTHER_UID}"):
            EventPublisher(f"ipc://{shared}/theirs/events.sock")
        open_dir = tmp_path / "open"
        open_dir.mkdir()
        open_dir.chmod(0o777)
        with pytest.raises(ValueError, match="writable by other users"):
            EventPublisher(f"ipc://{open_dir}/events.sock")
        as_other_user(sys.executable, "-c", "import socket; socket.socket(socket.AF_UNIX).bind("
                      f"'{shared}/events.sock')")
        with pytest.raises(ValueError, match=f"belongs to uid {OTHER_UID}"):
            EventPublisher(f"ipc://{shared}/events.sock")
        with EventPublisher(f"ipc://{shared}/mine.sock") as pub:  # sticky /tmp-like: fine
            assert os.stat(f"{shared}/mine.sock").st_mode & 0o077 == 0  # this user only
            assert pub.address.endswith("mine.sock")
    finally:
        shutil.rmtree(shared)
