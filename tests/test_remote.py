"""RemoteTier against a real redis-server on 127.0.0.1: round trips, bad values, faults, AUTH."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("redis") is None and os.environ.get("GPUKV_REQUIRE_REDIS") != "1":
    pytest.skip("python package 'redis' not installed (pip install redis hiredis)",
                allow_module_level=True)

from gpukv.tiers import codec as chunk_codec  # noqa: E402
from gpukv.tiers.remote import RemoteTier, mask_url  # noqa: E402

FP = "llama-8b|mha|2,NB,BS,H,D|bf16|2048|16"
TIMEOUT_S = 0.3
MARGIN_S = 1.0  # generous: a call may take timeout_s plus scheduling noise, never a retry storm


def payload(seed: int, nbytes: int = 4096) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)


def wait_until(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def timed(fn, *args):
    start = time.monotonic()
    result = fn(*args)
    return result, time.monotonic() - start


@pytest.fixture
def tier(redis_server):
    with RemoteTier(redis_server.url, timeout_s=TIMEOUT_S) as tier:
        yield tier


# --------------------------------------------------------------------------- round trips
def test_round_trip_is_bit_exact_and_counted(tier, redis_server):
    keys = [f"llama-8b/0/{i:04x}" for i in range(5)]
    for i, key in enumerate(keys):
        assert tier.submit(key, FP, payload(i)) is True
    assert tier.flush(timeout_s=10)

    assert tier.contains_many(keys + ["llama-8b/0/absent"]) == [True] * 5 + [False]
    loaded = tier.load_many(keys + ["llama-8b/0/absent"], FP, 4096)
    for i in range(5):
        assert torch.equal(loaded[i], payload(i))
    assert loaded[5] is None
    assert torch.equal(tier.load(keys[2], FP, 4096), payload(2))

    stats = tier.stats()
    assert (stats["stored"], stats["hits"], stats["misses"]) == (5, 6, 1)
    assert (stats["dropped"], stats["corrupt"], stats["errors"]) == (0, 0, 0)
    assert stats["bytes_stored"] == 5 * 4096 and stats["connected"] is True
    assert stats["queue_depth"] == 0 and stats["pending"] == 0
    # The value on the server is a codec blob (the disk format), under the namespaced name.
    raw = redis_server.client().get(f"gpukv:{keys[0]}")
    decoded, reason = chunk_codec.decode(raw, keys[0], FP, 4096)
    assert reason == "" and torch.equal(decoded, payload(0))


def test_empty_requests_touch_nothing(tier):
    assert tier.contains_many([]) == [] and tier.load_many([], FP, 1) == []
    assert tier.stats()["misses"] == 0


def test_namespaces_never_collide(redis_server):
    with RemoteTier(redis_server.url, namespace="tenant-a") as a, \
            RemoteTier(redis_server.url, namespace="tenant-b") as b:
        assert a.submit("m/0/aa", FP, payload(1)) and b.submit("m/0/aa", FP, payload(2))
        assert a.submit("m/0/only-a", FP, payload(3))
        assert a.flush(10) and b.flush(10)
        assert torch.equal(a.load("m/0/aa", FP, 4096), payload(1))
        assert torch.equal(b.load("m/0/aa", FP, 4096), payload(2))
        assert b.contains_many(["m/0/only-a"]) == [False]
    names = sorted(redis_server.client().keys("*"))
    assert names == [b"tenant-a:m/0/aa", b"tenant-a:m/0/only-a", b"tenant-b:m/0/aa"]


def test_ttl_sets_an_expiry(redis_server):
    with RemoteTier(redis_server.url, ttl_s=30) as tier:
        assert tier.submit("m/0/ttl", FP, payload(0)) and tier.flush(10)
    assert 0 < redis_server.client().pttl("gpukv:m/0/ttl") <= 30_000
    with RemoteTier(redis_server.url) as tier:
        assert tier.submit("m/0/forever", FP, payload(0)) and tier.flush(10)
    assert redis_server.client().pttl("gpukv:m/0/forever") == -1


def test_concurrent_callers(tier):
    errors: list[BaseException] = []

    def worker(rank: int) -> None:
        try:
            keys = [f"m/{rank}/{i}" for i in range(20)]
            for i, key in enumerate(keys):
                assert tier.submit(key, FP, payload(100 * rank + i, 1024))
            assert tier.flush(10)
            for i, got in enumerate(tier.load_many(keys, FP, 1024)):
                assert torch.equal(got, payload(100 * rank + i, 1024))
        except BaseException as exc:  # reported to the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert tier.stats()["stored"] == 80 and tier.stats()["hits"] == 80


# --------------------------------------------------------------------------- bad values
def _bad_values(key: str) -> dict[str, bytes]:
    good = chunk_codec.encode(key, FP, payload(7))
    flipped = bytearray(good)
    flipped[-100] ^= 0xFF  # inside the payload: only the checksum can tell
    return {
        "corrupted": bytes(flipped),
        "truncated": good[:-10],
        "foreign": chunk_codec.encode(key, FP.replace("bf16", "fp16"), payload(7)),
        "other_key": chunk_codec.encode("m/0/someone-else", FP, payload(7)),
        "wrong_size": chunk_codec.encode(key, FP, payload(7, 2048)),
        "garbage": b"not a safetensors blob",
        "empty": b"",
    }


@pytest.mark.parametrize("kind", ["corrupted", "truncated", "foreign", "other_key",
                                  "wrong_size", "garbage", "empty"])
def test_bad_values_are_misses_and_get_deleted(tier, redis_server, kind, caplog):
    key = f"m/0/{kind}"
    raw = redis_server.client()
    raw.set(f"gpukv:{key}", _bad_values(key)[kind])
    assert tier.contains_many([key]) == [True]  # EXISTS cannot tell; the load checks

    with caplog.at_level(logging.WARNING, logger="gpukv.tiers.remote"):
        assert tier.load_many([key], FP, 4096) == [None]
    assert tier.flush(10)
    assert raw.exists(f"gpukv:{key}") == 0
    stats = tier.stats()
    assert (stats["corrupt"], stats["misses"], stats["hits"], stats["deleted"]) == (1, 1, 0, 1)
    assert any("bad value" in r.getMessage() and key in r.getMessage() for r in caplog.records)


def test_a_bad_value_does_not_spoil_its_batch(tier, redis_server):
    assert tier.submit("m/0/good", FP, payload(1)) and tier.flush(10)
    redis_server.client().set("gpukv:m/0/bad", b"junk")
    got = tier.load_many(["m/0/good", "m/0/bad", "m/0/none"], FP, 4096)
    assert torch.equal(got[0], payload(1)) and got[1] is None and got[2] is None
    assert tier.stats()["corrupt"] == 1 and tier.stats()["misses"] == 2


# --------------------------------------------------------------------------- faults
def test_server_stopped_mid_run_then_restarted(tier, redis_server):
    assert tier.submit("m/0/before", FP, payload(1)) and tier.flush(10)
    redis_server.stop()

    # Nothing raises, nothing stalls; the first call notices, later ones answer at once.
    found, elapsed = timed(tier.contains_many, ["m/0/before"])
    assert found == [False] and elapsed < TIMEOUT_S + MARGIN_S
    loaded, elapsed = timed(tier.load, "m/0/before", FP, 4096)
    assert loaded is None and elapsed < TIMEOUT_S + MARGIN_S
    accepted = [tier.submit(f"m/0/during{i}", FP, payload(i)) for i in range(10)]
    assert tier.flush(timeout_s=TIMEOUT_S + MARGIN_S)
    stats = tier.stats()
    assert stats["connected"] is False
    assert stats["stored"] == 1 and stats["dropped"] == 10 and accepted == [False] * 10
    assert stats["errors"] >= 1

    redis_server.start()  # same port, empty (no persistence)
    assert wait_until(lambda: tier.stats()["connected"], timeout_s=10)
    assert tier.submit("m/0/after", FP, payload(2)) and tier.flush(10)
    assert torch.equal(tier.load("m/0/after", FP, 4096), payload(2))
    assert tier.load("m/0/before", FP, 4096) is None  # lost with the restart: a plain miss
    assert tier.stats()["stored"] == 2


def test_queued_stores_are_dropped_when_the_server_dies(redis_server):
    with RemoteTier(redis_server.url, timeout_s=TIMEOUT_S, batch_size=1) as tier:
        redis_server.stop()
        results = [tier.submit(f"m/0/{i}", FP, payload(i)) for i in range(20)]
        assert tier.flush(timeout_s=10)
        stats = tier.stats()
        # Whatever was accepted before the writer noticed is dropped afterwards, and counted.
        assert stats["stored"] == 0 and stats["dropped"] == 20 and stats["pending"] == 0
        assert results[0] is True  # accepted: the tier had not noticed the fault yet


def test_slow_server_never_stalls_a_caller(redis_server):
    timeout_s = 1.0
    tier = RemoteTier(redis_server.url, timeout_s=timeout_s)
    assert tier.submit("m/0/k", FP, payload(1)) and tier.flush(10)
    redis_server.pause()  # SIGSTOP: connections stay open, nothing answers
    try:
        found, elapsed = timed(tier.contains_many, ["m/0/k"])
        assert found == [False] and timeout_s * 0.9 < elapsed < timeout_s + MARGIN_S
        for call, args in [(tier.load_many, (["m/0/k"], FP, 4096)),
                           (tier.contains_many, (["m/0/k"],)),
                           (tier.submit, ("m/0/x", FP, payload(2)))]:
            _, elapsed = timed(call, *args)
            assert elapsed < timeout_s * 0.9  # marked down: no socket wait (the counts below)
        stats = tier.stats()
        assert stats["connected"] is False and stats["skipped"] == 2 and stats["dropped"] == 1
    finally:
        redis_server.resume()
    assert wait_until(lambda: tier.stats()["connected"], timeout_s=10)
    assert torch.equal(tier.load("m/0/k", FP, 4096), payload(1))
    tier.close()


def test_bounded_queue_drops_and_counts(redis_server):
    # A long timeout and a paused server hold the writer inside its first write, so the queue
    # (2 slots) fills deterministically.
    with RemoteTier(redis_server.url, timeout_s=20, queue_size=2, batch_size=1) as tier:
        redis_server.pause()
        try:
            assert tier.submit("m/0/0", FP, payload(0))
            assert wait_until(lambda: tier.stats()["queue_depth"] == 0)  # the writer took it
            assert [tier.submit(f"m/0/{i}", FP, payload(i)) for i in range(1, 5)] == \
                [True, True, False, False]
            assert tier.stats()["queue_depth"] == 2 and tier.stats()["dropped"] == 2
        finally:
            redis_server.resume()
        assert tier.flush(timeout_s=20)
        assert tier.contains_many([f"m/0/{i}" for i in range(5)]) == [True] * 3 + [False] * 2
        assert (tier.stats()["stored"], tier.stats()["dropped"]) == (3, 2)


def test_noeviction_server_refusals_are_counted_drops(redis_factory):
    server = redis_factory(extra_args=["--maxmemory", "4mb", "--maxmemory-policy", "noeviction"])
    with RemoteTier(server.url, timeout_s=TIMEOUT_S) as tier:
        for i in range(16):
            assert tier.submit(f"m/0/{i}", FP, payload(i, 512 << 10))
        assert tier.flush(10)
        stats = tier.stats()
        assert stats["stored"] + stats["dropped"] == 16
        assert stats["stored"] >= 1 and stats["dropped"] >= 8  # 4 MiB hold a few 512 KiB values
        assert stats["errors"] == stats["dropped"] and stats["connected"] is True
        assert sum(tier.contains_many([f"m/0/{i}" for i in range(16)])) == stats["stored"]


def test_allkeys_lru_server_evicts_old_chunks_as_plain_misses(redis_factory):
    server = redis_factory(extra_args=["--maxmemory", "4mb", "--maxmemory-policy", "allkeys-lru"])
    with RemoteTier(server.url, timeout_s=TIMEOUT_S) as tier:
        for i in range(16):
            assert tier.submit(f"m/0/{i}", FP, payload(i, 512 << 10))
        assert tier.flush(10)
        assert tier.stats()["stored"] == 16 and tier.stats()["dropped"] == 0
        got = tier.load_many([f"m/0/{i}" for i in range(16)], FP, 512 << 10)
        assert got[0] is None and torch.equal(got[15], payload(15, 512 << 10))
        assert tier.stats()["corrupt"] == 0 and tier.stats()["errors"] == 0


def test_drop_warnings_are_rate_limited(redis_server, caplog):
    with RemoteTier(redis_server.url, timeout_s=TIMEOUT_S) as tier:
        redis_server.stop()
        tier.contains_many(["m/0/x"])  # notices the fault
        with caplog.at_level(logging.WARNING, logger="gpukv.tiers.remote"):
            for i in range(50):
                assert tier.submit(f"m/0/{i}", FP, payload(i, 16)) is False
        drops = [r for r in caplog.records if "dropped" in r.getMessage()]
        assert len(drops) == 1 and tier.stats()["dropped"] == 50


def test_close_drops_unsent_writes_and_refuses_further_use(redis_server):
    tier = RemoteTier(redis_server.url, timeout_s=TIMEOUT_S)
    tier.close()
    tier.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        tier.submit("m/0/x", FP, payload(0))
    with pytest.raises(RuntimeError, match="closed"):
        tier.load("m/0/x", FP, 4096)


# --------------------------------------------------------------------------- one round trip, one budget
def test_load_many_of_a_run_is_one_round_trip_on_a_slow_server(delay_proxy):
    keys = [f"m/0/{i:02x}" for i in range(16)]
    with RemoteTier(delay_proxy.url(), timeout_s=3.0) as tier:
        for i, key in enumerate(keys):
            assert tier.submit(key, FP, payload(i))
        assert tier.flush(10)
        delay_proxy.delay_s = 0.3  # every round trip now costs 0.3 s
        delay_proxy.reset()
        got, elapsed = timed(tier.load_many, keys + ["m/0/absent"], FP, 4096)
        assert delay_proxy.turns == 1
        assert all(torch.equal(g, payload(i)) for i, g in enumerate(got[:16])) and got[16] is None
        assert elapsed < 5.0  # sanity only: 16 round trips would be 4.8 s plus transfers
        stats = tier.stats()
        assert (stats["hits"], stats["misses"], stats["timeouts"]) == (16, 1, 0)
        delay_proxy.reset()
        assert tier.contains_many(keys) == [True] * 16 and delay_proxy.turns == 1


def test_an_answer_past_the_budget_misses_all_marks_down_and_recovers(delay_proxy):
    keys = [f"m/0/{i}" for i in range(8)]
    with RemoteTier(delay_proxy.url(), timeout_s=5.0) as tier:  # sockets alone would wait 5 s
        for i, key in enumerate(keys):
            assert tier.submit(key, FP, payload(i))
        assert tier.flush(10)
        delay_proxy.delay_s = 1.5
        got, elapsed = timed(lambda: tier.load_many(keys, FP, 4096, budget_s=0.2))
        assert got == [None] * 8 and elapsed < 0.2 + MARGIN_S
        stats = tier.stats()
        assert (stats["timeouts"], stats["misses"], stats["connected"]) == (1, 8, False)
        # Marked down: the next lookup answers at once, without waiting on the server.
        got, elapsed = timed(tier.load_many, keys, FP, 4096)
        assert got == [None] * 8 and tier.stats()["skipped"] == 1  # no round trip
        assert elapsed < 1.5 * 0.9  # inside the proxy's delay: nothing waited on the socket
        delay_proxy.delay_s = 0.0
        assert wait_until(lambda: tier.stats()["connected"], timeout_s=15)
        got = tier.load_many(keys, FP, 4096)
        assert all(torch.equal(g, payload(i)) for i, g in enumerate(got))


def test_bad_budget_raises_and_touches_nothing(tier):
    for budget in (0, -1.0, True, "1"):
        with pytest.raises(ValueError, match="budget_s"):
            tier.load_many(["m/0/x"], FP, 4096, budget_s=budget)
        with pytest.raises(ValueError, match="budget_s"):
            tier.contains_many(["m/0/x"], budget_s=budget)
    assert tier.stats()["misses"] == 0


def test_write_queue_is_bounded_by_bytes(redis_server):
    # A paused server holds the writer inside its first pipeline; then only bytes limit the queue.
    with RemoteTier(redis_server.url, timeout_s=20, queue_size=100, queue_bytes=10_000,
                    batch_size=1) as tier:
        redis_server.pause()
        try:
            assert tier.submit("m/0/hold", FP, payload(0))
            assert wait_until(lambda: tier.stats()["queue_depth"] == 0)
            accepted = [tier.submit(f"m/0/{i}", FP, payload(i)) for i in range(1, 5)]
            assert accepted == [True, True, False, False]  # 2 x 4096 B fit in 10_000 B
            stats = tier.stats()
            assert (stats["queued_bytes"], stats["queue_depth"], stats["dropped"]) == (8192, 2, 2)
        finally:
            redis_server.resume()
        assert tier.flush(timeout_s=20) and tier.stats()["stored"] == 3


# --------------------------------------------------------------------------- events
def _replay(events):
    held = set()
    for event, key, _ in events:
        (held.add if event == "stored" else held.discard)(key)
    return held


def test_events_replay_to_the_keys_this_instance_wrote_and_did_not_delete(redis_server):
    events: list[tuple] = []
    raw = redis_server.client()
    with RemoteTier(redis_server.url, on_event=lambda *e: events.append(e)) as tier:
        keys = [f"m/0/{i}" for i in range(4)]
        for i, key in enumerate(keys):
            assert tier.submit(key, FP, payload(i))
        assert tier.flush(10)
        raw.set(f"gpukv:{keys[1]}", b"junk")           # one of ours goes bad
        raw.set("gpukv:m/0/stranger", b"junk")          # a bad value we never wrote
        assert tier.load_many([keys[1], "m/0/stranger", keys[2]], FP, 4096)[2] is not None
        assert tier.flush(10)
    assert events == [("stored", k, "written") for k in keys] + [
        ("removed", keys[1], "corrupt"), ("removed", "m/0/stranger", "corrupt")]
    on_server = {name.decode().removeprefix("gpukv:") for name in raw.keys("gpukv:*")}
    assert _replay(events) == on_server == {keys[0], keys[2], keys[3]}


def test_refused_writes_are_not_announced(redis_factory):
    server = redis_factory(extra_args=["--maxmemory", "4mb", "--maxmemory-policy", "noeviction"])
    events: list[tuple] = []
    with RemoteTier(server.url, timeout_s=TIMEOUT_S, on_event=lambda *e: events.append(e)) as tier:
        for i in range(16):
            assert tier.submit(f"m/0/{i}", FP, payload(i, 512 << 10))
        assert tier.flush(10)
        stats = tier.stats()
    assert stats["dropped"] >= 8 and len(events) == stats["stored"]
    on_server = {name.decode().removeprefix("gpukv:") for name in server.client().keys("gpukv:*")}
    assert _replay(events) == on_server


# --------------------------------------------------------------------------- start-up errors
def test_auth_correct_password_works(redis_factory):
    server = redis_factory(password="s3cret")
    with RemoteTier(server.url) as tier:
        assert tier.submit("m/0/a", FP, payload(0)) and tier.flush(10)
        assert torch.equal(tier.load("m/0/a", FP, 4096), payload(0))


@pytest.mark.parametrize("password", [None, "wrong-pw"])
def test_auth_missing_or_wrong_password_is_a_clear_error(redis_factory, password):
    server = redis_factory(password="s3cret")
    auth = f":{password}@" if password else ""
    url = f"redis://{auth}127.0.0.1:{server.port}/0"
    with pytest.raises(ValueError, match="authentication failed") as info:
        RemoteTier(url)
    message = str(info.value)
    assert f"127.0.0.1:{server.port}" in message
    assert "wrong-pw" not in message and "s3cret" not in message
    if password:
        assert ":***@" in message


def test_unreachable_at_start_is_a_clear_error(redis_server):
    port = redis_server.port
    redis_server.stop()
    with pytest.raises(ValueError, match=f"unreachable.*{port}|{port}.*unreachable"):
        RemoteTier(f"redis://:pw@127.0.0.1:{port}/0", timeout_s=TIMEOUT_S)


@pytest.mark.parametrize("kwargs, match", [
    (dict(timeout_s=0), "timeout_s"), (dict(queue_size=0), "queue_size"),
    (dict(batch_size=0), "batch_size"), (dict(ttl_s=-1), "ttl_s"),
    (dict(namespace=""), "namespace"),
])
def test_bad_arguments_name_the_value(redis_server, kwargs, match):
    with pytest.raises(ValueError, match=match):
        RemoteTier(redis_server.url, **kwargs)


def test_bad_url_and_bad_payload(tier):
    with pytest.raises(ValueError, match=r"http://u:\*\*\*@h:1/0.*scheme must be"):
        RemoteTier("http://u:pw@h:1/0")
    with pytest.raises(ValueError, match="uint8"):
        tier.submit("m/0/x", FP, torch.zeros(4, dtype=torch.float32))
    with pytest.raises(ValueError, match="key"):
        tier.contains_many([""])


def test_mask_url():
    assert mask_url("redis://user:pw@host:6379/0") == "redis://user:***@host:6379/0"
    assert mask_url("rediss://:pw@host:6380/1?ssl_ca_certs=/x") == \
        "rediss://:***@host:6380/1?ssl_ca_certs=/x"
    assert mask_url("redis://host:6379/0") == "redis://host:6379/0"


# --------------------------------------------------------------------------- transports
def test_valkey_scheme_is_an_alias(redis_server):
    with RemoteTier(redis_server.url.replace("redis://", "valkey://")) as tier:
        assert tier.submit("m/0/v", FP, payload(5)) and tier.flush(10)
        assert torch.equal(tier.load("m/0/v", FP, 4096), payload(5))


def test_unix_socket_url(redis_factory):
    server = redis_factory(unixsocket=True)
    with RemoteTier(f"unix://{server.unixsocket}?db=0") as tier:
        assert tier.submit("m/0/u", FP, payload(3)) and tier.flush(10)
        assert torch.equal(tier.load("m/0/u", FP, 4096), payload(3))


def _make_tls_files(directory: Path) -> dict[str, str]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not on PATH (needed to make a test certificate)")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return {"cert": str(cert), "key": str(key), "ca": str(cert)}


def test_tls_url(redis_factory, tmp_path):
    try:
        server = redis_factory(tls=_make_tls_files(tmp_path), password="pw")
    except RuntimeError as exc:
        if "TLS support" not in str(exc):
            raise
        pytest.skip("this server binary was built without TLS")
    assert server.url.startswith("rediss://")
    with RemoteTier(server.url) as tier:
        assert tier.submit("m/0/t", FP, payload(4)) and tier.flush(10)
        assert torch.equal(tier.load("m/0/t", FP, 4096), payload(4))
    plain = f"redis://:pw@127.0.0.1:{server.port}/0"
    with pytest.raises(ValueError, match="remote URL"):
        RemoteTier(plain, timeout_s=TIMEOUT_S)


def test_cluster_url_on_a_one_node_cluster(redis_factory):
    server = redis_factory(cluster=True)
    with RemoteTier(f"redis+cluster://127.0.0.1:{server.port}") as tier:
        keys = [f"m/0/{i}" for i in range(20)]  # spread over many hash slots
        for i, key in enumerate(keys):
            assert tier.submit(key, FP, payload(i, 512))
        assert tier.flush(10)
        assert tier.contains_many(keys + ["m/0/none"]) == [True] * 20 + [False]
        for i, got in enumerate(tier.load_many(keys, FP, 512)):
            assert torch.equal(got, payload(i, 512))
