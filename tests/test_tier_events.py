"""Tier events: replaying them gives exactly what each tier holds (eviction, a corrupt file, an
unreadable file, a restart); delivery is ordered, outside the tier lock, and survives a raising
subscriber."""

from __future__ import annotations

import threading

import pytest
import torch

from gpukv.tiers import codec as chunk_codec
from gpukv.tiers.disk import DiskTier
from gpukv.tiers.events import TierEvents

WAIT_S = 10.0


def _payload(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)


def replay(events: list[tuple]) -> set[str]:
    held: set[str] = set()
    for event, key, _reason in events:
        if event == "stored":
            held.add(key)
        else:
            assert event == "removed"
            held.discard(key)
    return held


def disk_keys(tier: DiskTier) -> set[str]:
    """The keys of the chunk files really in the folder (read from their headers)."""
    keys = set()
    for path in tier.root.glob("*/*.safetensors"):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as f:
                keys.add(chunk_codec.read_metadata(f)["key"])
    return keys


def _chunk_path(tier: DiskTier, key: str):
    name = tier._file_name(key)
    return tier.root / name[:2] / name


# ---- the ordering machinery -----------------------------------------------------------------
def test_events_are_delivered_in_order_and_never_make_a_caller_wait():
    delivered: list[tuple] = []
    entered, release = threading.Event(), threading.Event()

    def callback(event: str, key: str, reason: str) -> None:
        delivered.append((event, key, reason))
        if key == "first":
            entered.set()
            assert release.wait(WAIT_S)

    events = TierEvents(callback, "t")
    first = threading.Thread(target=lambda: (events.record("stored", "first", "written"),
                                             events.deliver()))
    first.start()
    assert entered.wait(WAIT_S)  # thread `first` is inside the callback
    events.record("removed", "second", "evicted")
    events.deliver()             # returns at once: the delivering thread will take it
    assert delivered == [("stored", "first", "written")]
    release.set()
    first.join(WAIT_S)
    assert delivered == [("stored", "first", "written"), ("removed", "second", "evicted")]


def test_a_callback_may_cause_events_itself_without_deadlock():
    delivered: list[str] = []
    events: TierEvents

    def callback(event: str, key: str, reason: str) -> None:
        delivered.append(key)
        if key == "a":
            events.record("removed", "b", "corrupt")
            events.deliver()

    events = TierEvents(callback, "t")
    events.record("stored", "a", "written")
    events.record("stored", "c", "written")
    events.deliver()
    assert delivered == ["a", "c", "b"]  # recorded order: a, c (before the callback), then b


def test_bad_callback_and_bad_reason():
    with pytest.raises(TypeError, match="on_event"):
        TierEvents(42, "t")  # type: ignore[arg-type]
    with pytest.raises(AssertionError):
        TierEvents(lambda *e: None, "t").record("stored", "k", "evicted")


# ---- disk -----------------------------------------------------------------------------------
def test_disk_events_replay_to_what_the_tier_holds_across_a_restart(tmp_path):
    one = len(chunk_codec.encode("m/0/0", "fp", _payload(4096, 0)))
    events: list[tuple] = []
    tier = DiskTier(tmp_path, capacity_bytes=3 * one, on_event=lambda *e: events.append(e))
    keys = [f"m/0/{i}" for i in range(5)]
    for i, key in enumerate(keys):
        assert tier.submit(key, "fp", _payload(4096, i)) and tier.flush(WAIT_S)
    blob = bytearray(_chunk_path(tier, keys[3]).read_bytes())
    blob[-7] ^= 0x10
    _chunk_path(tier, keys[3]).write_bytes(bytes(blob))     # a corrupt file
    _chunk_path(tier, keys[4]).unlink()
    _chunk_path(tier, keys[4]).mkdir()                      # an unreadable one
    assert tier.load(keys[3], "fp", 4096) is None and tier.load(keys[4], "fp", 4096) is None
    assert events == [
        ("stored", keys[0], "written"), ("stored", keys[1], "written"),
        ("stored", keys[2], "written"),
        ("stored", keys[3], "written"), ("removed", keys[0], "evicted"),
        ("stored", keys[4], "written"), ("removed", keys[1], "evicted"),
        ("removed", keys[3], "corrupt"), ("removed", keys[4], "tier_error"),
    ]
    held = {k for k, h in zip(keys, tier.contains_many(keys)) if h}
    assert replay(events) == held == disk_keys(tier) == {keys[2]}
    assert tier.close()

    # A file under another key's name is never announced (removed at start-up).
    planted = _chunk_path(tier, "m/0/planted")
    planted.parent.mkdir(mode=0o700, exist_ok=True)
    planted.write_bytes(_chunk_path(tier, keys[2]).read_bytes())
    events2: list[tuple] = []
    again = DiskTier(tmp_path, capacity_bytes=3 * one, on_event=lambda *e: events2.append(e))
    assert events2 == [("stored", keys[2], "restart")]
    assert not planted.exists()
    more = [f"m/0/{i}" for i in range(5, 8)]
    for i, key in enumerate(more):
        assert again.submit(key, "fp", _payload(4096, 5 + i)) and again.flush(WAIT_S)
    assert events2[1:] == [("stored", more[0], "written"), ("stored", more[1], "written"),
                           ("stored", more[2], "written"), ("removed", keys[2], "evicted")]
    held = {k for k, h in zip(keys + more, again.contains_many(keys + more)) if h}
    assert replay(events2) == held == disk_keys(again) == set(more)
    assert again.stats()["event_errors"] == 0
    again.close()


def test_disk_callbacks_run_outside_the_lock_and_see_the_new_state(tmp_path):
    tier = DiskTier(tmp_path)
    seen: list[tuple] = []
    # The callback calls back into the tier: under the tier lock this would deadlock.
    tier._events._callback = lambda e, k, r: seen.append((e, k, tier.contains_many([k])[0]))
    assert tier.submit("m/0/a", "fp", _payload(64, 0)) and tier.flush(WAIT_S)
    _chunk_path(tier, "m/0/a").write_bytes(b"junk")
    assert tier.load("m/0/a", "fp", 64) is None
    assert seen == [("stored", "m/0/a", True), ("removed", "m/0/a", False)]
    tier.close()


def test_a_raising_subscriber_is_counted_and_the_tier_goes_on(tmp_path):
    def broken(*event):
        raise RuntimeError("subscriber bug")

    tier = DiskTier(tmp_path, on_event=broken)
    for i in range(3):
        assert tier.submit(f"m/0/{i}", "fp", _payload(64, i))
    assert tier.flush(WAIT_S)
    assert tier.contains_many([f"m/0/{i}" for i in range(3)]) == [True] * 3
    stats = tier.stats()
    assert (stats["stored"], stats["event_errors"], stats["errors"]) == (3, 3, 0)
    tier.close()
