"""The safetensors disk tier: atomic files, warm restart, LRU budget, bad files are misses."""

import errno
import logging
import os
import stat
import threading
import time
from pathlib import Path

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


def hold_writes(tier: DiskTier) -> tuple[threading.Event, threading.Event]:
    """Make the writer thread stop at its next chunk: ``entered`` is set when it is there, and it
    writes once ``release`` is set."""
    entered, release = threading.Event(), threading.Event()
    real_write = tier._write_one

    def held_write(*args):
        entered.set()
        assert release.wait(10)
        real_write(*args)

    tier._write_one = held_write
    return entered, release


def test_queue_full_drops_and_counts_and_flush_honours_its_timeout(tmp_path):
    tier = DiskTier(tmp_path, queue_size=2)
    entered, release = hold_writes(tier)  # the writer thread holds the first chunk
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
    entered, release = hold_writes(tier)
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


# ---- fail safe: any OSError loading a chunk is a miss that drops the entry ------------------
def _chunk_path(tier, key):
    name = tier._file_name(key)
    return tier.root / name[:2] / name


def test_a_directory_in_place_of_a_chunk_is_a_miss_that_drops_the_entry(tmp_path):
    tier = DiskTier(tmp_path / "d")
    for key in ("m/0/a", "m/0/b"):
        assert tier.submit(key, "fp", _payload(256, 1))
    assert tier.flush(10)
    path = _chunk_path(tier, "m/0/a")
    path.unlink()
    path.mkdir()                                   # EISDIR on read
    assert tier.load("m/0/a", "fp", 256) is None
    stats = tier.stats()
    assert (stats["errors"], stats["misses"], stats["corrupt"], stats["files"]) == (1, 1, 0, 1)
    assert tier.contains_many(["m/0/a", "m/0/b"]) == [False, True]
    assert path.is_dir()                           # a folder is never removed
    assert tier.load("m/0/a", "fp", 256) is None   # answered from the index: no new error
    assert tier.stats()["errors"] == 1 and tier.stats()["misses"] == 2
    assert torch.equal(tier.load("m/0/b", "fp", 256), _payload(256, 1))
    # Storing it again cannot rename over the folder: counted, no temporary file left behind.
    assert tier.submit("m/0/a", "fp", _payload(256, 1)) and tier.flush(10)
    assert tier.stats()["errors"] == 2 and tier.contains_many(["m/0/a"]) == [False]
    assert list(tier.root.glob("*/*.tmp")) == []
    tier.close()


@pytest.mark.parametrize("error", [OSError(errno.EIO, "Input/output error"),
                                   PermissionError(errno.EACCES, "Permission denied")])
def test_an_oserror_reading_a_chunk_is_a_miss_that_drops_and_removes_it(tmp_path, monkeypatch,
                                                                         error):
    tier = DiskTier(tmp_path)
    for i in range(3):
        assert tier.submit(f"m/0/{i}", "fp", _payload(512, i))
    assert tier.flush(10)
    bad = _chunk_path(tier, "m/0/1")
    real_read = Path.read_bytes

    def read_bytes(self):
        if self == bad:
            raise error
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    got = tier.load_many([f"m/0/{i}" for i in range(3)], "fp", 512)
    assert torch.equal(got[0], _payload(512, 0)) and got[1] is None
    assert torch.equal(got[2], _payload(512, 2))
    assert not bad.exists()
    stats = tier.stats()
    assert (stats["errors"], stats["hits"], stats["misses"], stats["files"]) == (1, 2, 1, 2)
    assert tier.contains_many(["m/0/1"]) == [False]
    tier.close()


def test_a_vanished_file_is_a_plain_miss(tmp_path):
    tier = DiskTier(tmp_path)
    assert tier.submit("m/0/a", "fp", _payload(64, 0)) and tier.flush(10)
    _chunk_path(tier, "m/0/a").unlink()
    assert tier.load("m/0/a", "fp", 64) is None
    stats = tier.stats()
    assert (stats["errors"], stats["misses"], stats["files"], stats["used_bytes"]) == (0, 1, 0, 0)
    tier.close()


# ---- permissions ----------------------------------------------------------------------------
def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_are_0600_in_0700_folders_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        tier = DiskTier(tmp_path / "new" / "root")
        assert tier.submit("m/0/a", "fp", _payload(64, 0)) and tier.flush(10)
    finally:
        os.umask(old)
    path = _chunk_path(tier, "m/0/a")
    assert (_mode(tier.root), _mode(path.parent), _mode(path)) == (0o700, 0o700, 0o600)
    tier.close()


def test_an_existing_wide_root_is_tightened(tmp_path, caplog):
    root = tmp_path / "shared"
    root.mkdir()
    os.chmod(root, 0o755)
    with caplog.at_level(logging.WARNING, logger="gpukv.tiers.private_files"):
        DiskTier(root).close()
    assert _mode(root) == 0o700
    assert any("755" in r.getMessage() and "tightening" in r.getMessage() for r in caplog.records)


def test_a_root_owned_by_another_user_or_not_a_folder_is_refused(tmp_path, monkeypatch):
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a directory"):
        DiskTier(tmp_path / "file")
    root = tmp_path / "theirs"
    root.mkdir(mode=0o700)
    monkeypatch.setattr(os, "getuid", lambda: os.stat(root).st_uid + 1)
    with pytest.raises(ValueError, match="owned by uid"):
        DiskTier(root)


def test_restart_tightens_files_and_skips_links_and_leftovers(tmp_path):
    tier = DiskTier(tmp_path)
    for i in range(2):
        assert tier.submit(f"m/0/{i}", "fp", _payload(64, i))
    assert tier.flush(10) and tier.close()
    first, second = _chunk_path(tier, "m/0/0"), _chunk_path(tier, "m/0/1")
    os.chmod(first, 0o644)
    os.chmod(first.parent, 0o755)
    second.unlink()
    second.symlink_to(first)                              # a link is never served
    (first.parent / "leftover.safetensors.123.tmp").write_bytes(b"half")
    again = DiskTier(tmp_path)
    assert again.contains_many(["m/0/0", "m/0/1"]) == [True, False]
    assert (_mode(first), _mode(first.parent)) == (0o600, 0o700)
    assert list(tmp_path.glob("*/*.tmp")) == []
    assert torch.equal(again.load("m/0/0", "fp", 64), _payload(64, 0))
    again.close()
