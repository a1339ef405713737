"""The safetensors disk tier: atomic files, warm restart, LRU budget, bad files are misses."""

import threading
import time

import pytest
import torch

from gpukv.tiers import codec as chunk_codec
from gpukv.tiers.disk import DiskTier


def _payload(n, seed):
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_store_flush_and_load_bit_exact(tmp_path):
    tier = DiskTier(tmp_path)
    p = _payload(1000, 1)
    assert tier.submit("m/0/aa", "fp", p)
    assert tier.flush(10)
    assert tier.contains_many(["m/0/aa", "m/0/bb"]) == [True, False]
    assert torch.equal(tier.load("m/0/aa", "fp", 1000), p)
    assert tier.load("m/0/bb", "fp", 1000) is None
    assert list(tmp_path.glob("*/*.tmp")) == []
    tier.close()


def test_warm_restart_finds_chunks(tmp_path):
    tier = DiskTier(tmp_path)
    for i in range(3):
        tier.submit(f"m/0/{i}", "fp", _payload(512, i))
    tier.flush(10)
    tier.close()
    again = DiskTier(tmp_path)
    assert again.contains_many([f"m/0/{i}" for i in range(3)]) == [True] * 3
    assert torch.equal(again.load("m/0/2", "fp", 512), _payload(512, 2))
    assert again.stats()["files"] == 3
    again.close()


def test_lru_budget_evicts_oldest_and_loads_refresh(tmp_path):
    one = len(__import__("gpukv.tiers.codec", fromlist=["x"]).encode("m/0/0", "fp", _payload(4096, 0)))
    tier = DiskTier(tmp_path, capacity_bytes=3 * one)
    for i in range(3):
        tier.submit(f"m/0/{i}", "fp", _payload(4096, i))
        tier.flush(10)
    assert tier.load("m/0/0", "fp", 4096) is not None  # 0 is now the most recent
    tier.submit("m/0/3", "fp", _payload(4096, 3))
    tier.flush(10)
    assert tier.contains_many([f"m/0/{i}" for i in range(4)]) == [True, False, True, True]
    assert tier.stats()["evicted"] == 1 and tier.stats()["used_bytes"] <= 3 * one
    assert len(list(tmp_path.glob("*/*.safetensors"))) == 3
    tier.close()


def test_corrupted_truncated_and_foreign_files_are_misses_and_removed(tmp_path):
    tier = DiskTier(tmp_path)
    for i in range(3):
        tier.submit(f"m/0/{i}", "fp", _payload(2048, i))
    tier.flush(10)
    paths = {i: tmp_path / tier._file_name(f"m/0/{i}")[:2] / tier._file_name(f"m/0/{i}") for i in range(3)}
    blob = bytearray(paths[0].read_bytes())
    blob[-5] ^= 0x55
    paths[0].write_bytes(bytes(blob))                      # corrupted payload
    paths[1].write_bytes(paths[1].read_bytes()[:100])      # truncated
    assert tier.load("m/0/0", "fp", 2048) is None
    assert tier.load("m/0/1", "fp", 2048) is None
    assert tier.load("m/0/2", "other-layout", 2048) is None  # foreign fingerprint
    assert not paths[0].exists() and not paths[1].exists() and not paths[2].exists()
    assert tier.stats()["corrupt"] == 3
    assert tier.contains_many(["m/0/0", "m/0/1", "m/0/2"]) == [False] * 3
    tier.close()


def test_queue_full_drops_and_counts_and_flush_honours_its_timeout(tmp_path):
    tier = DiskTier(tmp_path, queue_size=2)
    entered, release = threading.Event(), threading.Event()
    real_write = tier._write_one

    def held_write(*args):
        entered.set()
        assert release.wait(10)
        real_write(*args)

    tier._write_one = held_write  # the writer thread holds the first chunk
    assert tier.submit("m/0/0", "fp", _payload(16, 0)) and entered.wait(10)
    accepted = [tier.submit(f"m/0/{i}", "fp", _payload(16, i)) for i in range(1, 6)]
    assert accepted == [True, True, False, False, False]
    assert tier.stats()["dropped"] == 3 and tier.stats()["queue_depth"] == 2
    start = time.monotonic()
    assert tier.flush(0.2) is False  # a full queue never blocks flush past its timeout
    assert time.monotonic() - start < 2.2
    release.set()
    assert tier.flush(10)
    assert tier.contains_many([f"m/0/{i}" for i in range(6)]) == [True] * 3 + [False] * 3
    assert tier.stats()["stored"] == 3
    assert tier.close()


def test_queue_bytes_bound_drops_and_counts(tmp_path):
    tier = DiskTier(tmp_path, queue_bytes=1000)
    entered, release = threading.Event(), threading.Event()
    real_write = tier._write_one

    def held_write(*args):
        entered.set()
        assert release.wait(10)
        real_write(*args)

    tier._write_one = held_write
    assert tier.submit("m/0/hold", "fp", _payload(1000, 0)) and entered.wait(10)
    assert tier.submit("m/0/a", "fp", _payload(600, 1))
    assert not tier.submit("m/0/b", "fp", _payload(600, 2))  # 1200 B > 1000 B queued
    assert tier.submit("m/0/c", "fp", _payload(400, 3))
    assert not tier.submit("m/0/big", "fp", _payload(1001, 4))
    assert tier.stats()["queued_bytes"] == 1000 and tier.stats()["dropped"] == 2
    release.set()
    assert tier.flush(10)
    assert tier.contains_many(["m/0/hold", "m/0/a", "m/0/b", "m/0/c", "m/0/big"]) == \
        [True, True, False, True, False]
    tier.close()


def test_an_unexpected_writer_failure_is_counted_and_the_writer_goes_on(tmp_path, monkeypatch):
    tier = DiskTier(tmp_path)
    real_encode = chunk_codec.encode

    def encode(key, fingerprint, payload):
        if key == "m/0/bad":
            raise RuntimeError("encoder bug")
        return real_encode(key, fingerprint, payload)

    monkeypatch.setattr(chunk_codec, "encode", encode)
    for key in ("m/0/a", "m/0/bad", "m/0/b"):
        assert tier.submit(key, "fp", _payload(64, 0))
    assert tier.flush(10)
    assert tier.contains_many(["m/0/a", "m/0/bad", "m/0/b"]) == [True, False, True]
    assert tier.stats()["errors"] == 1 and tier.stats()["stored"] == 2
    tier.close()


def test_close_writes_what_is_queued_then_refuses(tmp_path):
    tier = DiskTier(tmp_path)
    for i in range(5):
        assert tier.submit(f"m/0/{i}", "fp", _payload(64, i))
    assert tier.close(10)
    assert len(list(tmp_path.glob("*/*.safetensors"))) == 5
    assert tier.submit("m/0/late", "fp", _payload(64, 9)) is False
    assert tier.stats()["dropped"] == 1
    with pytest.raises(ValueError, match="uint8"):
        tier.submit("m/0/x", "fp", torch.zeros(4))
