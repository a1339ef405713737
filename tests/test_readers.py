"""Table test of resolving a caller's tp_size into extra reader shares (gpukv.engine.readers)."""

from __future__ import annotations

import pytest

from gpukv.engine.readers import MAX_READERS, legacy_extra_count, resolve_extra_count


@pytest.mark.parametrize("kind, tp_size, num_readers, extra", [
    ("mla", 1, None, 0),
    ("mla", 2, None, 1),
    ("mla", 8, None, 7),
    ("mla", 128, None, 127),
    ("mla", 8, 2, 1),      # explicit num_readers wins (e.g. tp=8, dcp=4: two readers)
    ("mla", 2, 8, 7),      # ... in either direction
    ("mla", 1, 1, 0),
    ("mha", 1, None, 0),
    ("mha", 8, None, 0),   # each MHA rank has its own object: one reader
    ("mha", 8, 4, 0),
    ("mha", 128, 128, 0),
])
def test_resolve_extra_count(kind, tp_size, num_readers, extra):
    assert resolve_extra_count(kind, tp_size, num_readers) == extra


@pytest.mark.parametrize("tp_size, world_size, extra", [
    (8, 1, 7),
    (4, 2, 3),
    (8, 8, 0),
    (1, 4, 0),
    (1, 1, 0),
    (2, 1, 1),
    (16, 8, 15),
])
def test_legacy_pairs_keep_their_meaning(tp_size, world_size, extra):
    assert legacy_extra_count(tp_size, world_size) == extra


@pytest.mark.parametrize("kwargs, bad", [
    (dict(kind="mla", tp_size=0), "tp_size"),
    (dict(kind="mla", tp_size=-1), "tp_size"),
    (dict(kind="mla", tp_size=MAX_READERS + 1), "tp_size"),
    (dict(kind="mha", tp_size=129), "tp_size"),   # validated for MHA too
    (dict(kind="mla", tp_size=2.0), "tp_size"),
    (dict(kind="mla", tp_size=True), "tp_size"),
    (dict(kind="mla", tp_size="2"), "tp_size"),
    (dict(kind="mla", tp_size=2, num_readers=0), "num_readers"),
    (dict(kind="mla", tp_size=2, num_readers=129), "num_readers"),
    (dict(kind="gqa", tp_size=2), "kind"),
])
def test_resolve_rejects_bad_values_by_name(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        resolve_extra_count(**kwargs)


@pytest.mark.parametrize("tp_size, world_size, bad", [
    (0, 1, "tp_size"), (129, 1, "tp_size"), (2, 0, "world_size"), (2, -3, "world_size"),
    (2, 1.5, "world_size"), (2, True, "world_size"),
])
def test_legacy_rejects_bad_values_by_name(tp_size, world_size, bad):
    with pytest.raises(ValueError, match=bad):
        legacy_extra_count(tp_size, world_size)
